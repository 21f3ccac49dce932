"""``__all__`` lists exactly the public names of every module, and every listed name exists."""

import importlib
import pkgutil

import pytest

import stablenet

MODULES = sorted(m.name for m in pkgutil.walk_packages(stablenet.__path__, "stablenet."))


@pytest.mark.parametrize("name", ["stablenet", *MODULES])
def test_all_is_exact(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for public in module.__all__:
        assert hasattr(module, public), f"{name}.__all__ lists missing {public}"
    defined = {
        k
        for k, v in vars(module).items()
        if not k.startswith("_") and getattr(v, "__module__", None) == name and callable(v)
    }
    assert defined <= set(module.__all__), f"{name} defines public {sorted(defined - set(module.__all__))}"
