"""The old module paths of renamed layer modules are deprecated aliases of the new ones (kept for one release)."""

import importlib
import sys

import pytest

ALIASES = {
    "stablenet.nn.fused": ["stablenet.nn.fused_rescaling"],
    "stablenet.nn.graphs": ["stablenet.nn.cuda_graphs"],
    "stablenet.nn.residual_layers": ["stablenet.nn.relu_residual"],
    "stablenet.nn.residual": ["stablenet.nn.skip", "stablenet.nn.export"],
}


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_old_module_path_is_a_deprecated_alias(old):
    new = [importlib.import_module(name) for name in ALIASES[old]]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; import .*{ALIASES[old][0]}"):
        alias = importlib.import_module(old)
    names = [name for module in new for name in module.__all__]
    assert sorted(alias.__all__) == sorted(names)
    for module in new:
        assert all(getattr(alias, name) is getattr(module, name) for name in module.__all__)
