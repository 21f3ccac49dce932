"""capture_weight_maps: which layers it records, and the parameter substitution its capture relies on (CPU).

The CUDA graphs themselves need a GPU (benchmarks/gpu_zoo_check.py compares graphed and eager training there);
here ``make_graphed_callables`` is replaced by the identity, which runs the same substituted map eagerly.
"""

import pytest
import torch
from torch import nn

import stablenet.nn as snn
from stablenet.models import create_model
from stablenet.nn import cuda_graphs, spectral_norm
from stablenet.nn.cuda_graphs import CapturedWeightMap, capturable, capture_weight_maps
from stablenet.train.config import TrainConfig


def test_capturable_layers():
    assert capturable(snn.SLLConv2d(4, 5))
    assert capturable(snn.SLLLinear(4, 5))
    assert capturable(snn.AOLConv2d(4, 4, 3, padding=1))
    assert capturable(snn.SRLinear(4, 4))
    assert not capturable(snn.CPLConv2d(4, 5))  # trains with the power-iteration estimate: nothing to capture
    assert capturable(snn.CPLConv2d(4, 5, input_size="any", train_estimate=False))
    assert capturable(snn.CPLConv2d(4, 5, input_size=8, train_estimate=False))  # "auto": fixed-step Gram off the CPU
    assert capturable(snn.CPLLinear(4, 5, train_estimate=False))
    no = {"train_estimate": False}  # by default spectral layers train with a power step, which is not captured
    assert not capturable(snn.SpectralConv2d(4, 4, 3, padding=1))
    assert capturable(snn.SpectralConv2d(4, 4, 3, padding=1, input_size="any", **no))  # the spatial bound
    assert capturable(snn.SpectralConv2d(4, 4, 3, padding=1, input_size=8, n_iter=6, **no))
    assert capturable(snn.SpectralLinear(4, 4, n_iter=5, **no))
    # host synchronisation (the adaptive Gram iteration's stopping test, the Cholesky verification): eager
    assert not capturable(snn.SpectralConv2d(4, 4, 3, padding=1, input_size=8, **no))
    assert not capturable(snn.SpectralConv2d(4, 4, 3, padding=1, input_size=8, method="cholesky", **no))
    assert not capturable(snn.SpectralLinear(4, 4, **no))
    assert not capturable(snn.CPLConv2d(4, 5, input_size=8, method="cholesky", train_estimate=False))
    assert not capturable(nn.Conv2d(4, 4, 3))


# Capturable maps, in the configuration they take on a GPU (where "auto" means the Gram iteration).
CAPTURABLE = [
    (lambda: snn.SLLConv2d(3, 4), (3, 6, 6)),
    (lambda: snn.SLLLinear(6, 8), (6,)),
    (lambda: snn.AOLConv2d(3, 5, 3, padding=1), (3, 6, 6)),
    (lambda: snn.SRConv2d(3, 3, 3, padding=1), (3, 6, 6)),
    (lambda: snn.CPLConv2d(3, 4, input_size="any", train_estimate=False), (3, 6, 6)),
    (lambda: snn.CPLConv2d(3, 4, input_size=6, method="gram", train_estimate=False), (3, 6, 6)),
    (lambda: snn.CPLLinear(6, 8, train_estimate=False), (6,)),
    # spectral layers train with the power-iteration estimate by default (nothing to capture); with the bound:
    (lambda: snn.SpectralConv2d(3, 4, 3, padding=1, input_size="any", train_estimate=False), (3, 6, 6)),
    (
        lambda: snn.SpectralConv2d(3, 4, 3, padding=1, input_size=6, n_iter=5, method="gram", train_estimate=False),
        (3, 6, 6),
    ),
    (lambda: snn.SpectralLinear(6, 8, n_iter=4, train_estimate=False), (6,)),
]


@pytest.mark.parametrize("factory, shape", CAPTURABLE)
def test_capturable_maps_read_nothing_back_to_the_host(monkeypatch, factory, shape):
    """A capture fails on any device-to-host read. The Python-level reads (item, bool, float, int, tolist, numpy)
    are made to raise while the map and its backward run; reads inside single operators (boolean masks,
    nonzero) are not seen here, and the code of these maps uses none."""
    torch.manual_seed(1)
    layer = factory().double().train()
    assert capturable(layer)
    x = torch.randn(2, *shape, dtype=torch.float64)

    def refuse(*args, **kwargs):
        raise AssertionError("a host read in a capturable weight map")

    monkeypatch.setattr(spectral_norm, "_capturing", lambda t: True)  # what a capture on a GPU sees

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    params = [p for p in layer.parameters() if p.requires_grad]
    out = layer(x)  # train mode: the map runs, forward and backward
    out.square().sum().backward()
    monkeypatch.undo()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_capture_counts_layers_and_turns_off():
    model = create_model("sll_xs", 10, 3, 32)
    n_sll = sum(isinstance(m, (snn.SLLConv2d, snn.SLLLinear)) for m in model.modules())
    assert capture_weight_maps(model) == n_sll > 0
    assert all(m._cache.graphs is not None for m in model.modules() if isinstance(m, snn.SLLConv2d))
    assert capture_weight_maps(model, enabled=False) == n_sll
    assert all(m._cache.graphs is None for m in model.modules() if isinstance(m, snn.SLLConv2d))


def test_graphs_do_not_apply_on_cpu():
    assert not CapturedWeightMap.applies([torch.zeros(2, requires_grad=True)])
    layer = snn.AOLConv2d(3, 3, 3, padding=1)
    capture_weight_maps(layer)
    x = torch.randn(2, 3, 5, 5)
    layer(x).sum().backward()  # the eager map, no capture attempted
    assert layer.weight.grad is not None


@pytest.mark.parametrize("factory, shape", CAPTURABLE)
def test_substituted_map_gives_eager_values_and_gradients(monkeypatch, factory, shape):
    """The captured function reads the graph's inputs in place of the parameters: same outputs and gradients."""
    calls = []

    def fake_make_graphed(fn, samples):
        calls.append([s.shape for s in samples])
        return fn  # run the substituted map eagerly with the real parameters as its inputs

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed)
    monkeypatch.setattr(CapturedWeightMap, "applies", staticmethod(lambda params: True))
    torch.manual_seed(0)
    eager = factory().double()
    graphed = factory().double()
    graphed.load_state_dict(eager.state_dict())
    capture_weight_maps(graphed)
    x = torch.randn(4, *shape, dtype=torch.float64)
    for _ in range(2):  # the second step reuses the capture
        out_e, out_g = eager(x), graphed(x)
        torch.testing.assert_close(out_g, out_e, rtol=0, atol=0)
        out_e.square().sum().backward()
        out_g.square().sum().backward()
    assert len(calls) == 1
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    # the parameters are the module's own again after the capture
    assert all(isinstance(p, nn.Parameter) for p in graphed.parameters())


def test_slots_reject_foreign_tensors():
    layer = snn.AOLLinear(3, 3)
    with pytest.raises(ValueError, match="not its parameters"):
        cuda_graphs._slots(layer, [torch.zeros(3)])


def test_train_config_refuses_graphs_with_second_order_regularizers():
    TrainConfig(cuda_graphs=True, regularizers=[{"name": "activation_decay", "weight": 0.1}])
    with pytest.raises(ValueError, match=r"cuda_graphs cannot differentiate gradients.*input_curvature"):
        TrainConfig(cuda_graphs=True, regularizers=[{"name": "input_curvature", "weight": 0.1}])
