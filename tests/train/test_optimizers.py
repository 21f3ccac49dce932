"""The optimizer registry: built-ins equal torch's optimizers, SAM around any of them, a user's optimizer by name or
as a callable, and one-line errors naming the registered names."""

import functools

import pytest
import torch

from stablenet.curvature.sam import SAM
from stablenet.train import TrainConfig, train
from stablenet.train import optimizers as registry
from stablenet.train.optimizers import create_optimizer, list_optimizers, register_optimizer


@pytest.fixture
def restore_registry(monkeypatch):
    monkeypatch.setattr(registry, "_OPTIMIZERS", dict(registry._OPTIMIZERS))


def _steps(optimizer_of, steps=5):
    """Weights of a small linear model after ``steps`` steps of the optimizer ``optimizer_of(params)``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = optimizer_of(list(model.parameters()))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("name", "direct"),
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-3)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=1e-3, momentum=0.8)),
    ],
)
def test_builtins_are_exactly_torchs_optimizers(name, direct):
    ours = _steps(lambda p: create_optimizer(name, p, lr=0.01, weight_decay=1e-3, momentum=0.8))
    for a, b in zip(ours, _steps(direct), strict=True):
        assert torch.equal(a, b)
    assert list_optimizers() == ("adam", "adamw", "sgd")


def test_sam_wraps_the_named_optimizer_with_its_hyperparameters():
    params = list(torch.nn.Linear(2, 2).parameters())
    opt = create_optimizer("sgd", params, lr=0.1, momentum=0.5, sam_rho=0.05, sam_adaptive=True)
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.5 and opt.defaults["sam_rho"] == 0.05 and opt.defaults["sam_adaptive"]
    adam = create_optimizer("adam", params, lr=0.1, momentum=0.5, sam_rho=0.05)
    assert isinstance(adam.base_optimizer, torch.optim.Adam) and "momentum" not in adam.defaults


def test_a_callable_is_accepted_and_gets_momentum_only_if_it_takes_it():
    params = list(torch.nn.Linear(2, 2).parameters())
    rms = create_optimizer(torch.optim.RMSprop, params, lr=0.1, momentum=0.7)
    assert isinstance(rms, torch.optim.RMSprop) and rms.defaults["momentum"] == 0.7
    adagrad = create_optimizer(torch.optim.Adagrad, params, lr=0.1, momentum=0.7)  # Adagrad has no momentum
    assert isinstance(adagrad, torch.optim.Adagrad) and adagrad.defaults["lr"] == 0.1
    nesterov = functools.partial(torch.optim.SGD, nesterov=True)
    assert create_optimizer(nesterov, params, lr=0.1, momentum=0.9).defaults["nesterov"]


def test_a_registered_optimizer_trains_by_name(tmp_path, restore_registry):
    calls = []

    @register_optimizer("logged_sgd")
    def logged_sgd(params, lr, weight_decay, momentum):
        calls.append((lr, weight_decay, momentum))
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)

    register_optimizer("logged_sgd", logged_sgd)  # the same factory again: a no-op
    assert "logged_sgd" in list_optimizers()
    config = TrainConfig(
        dataset="digits",
        model_args={"width": 64, "depth": 1, "inner_width": 64},
        epochs=1,
        optimizer="logged_sgd",
        lr=0.01,
        momentum=0.5,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    result = train(config, progress=False)
    assert calls == [(0.01, 0.0, 0.5)] and len(result.metrics) == 1
    with pytest.raises(ValueError, match="optimizer name 'logged_sgd' is already registered"):
        register_optimizer("logged_sgd", torch.optim.SGD)


def test_an_unknown_optimizer_is_a_one_line_error_naming_the_registered_ones(restore_registry):
    params = list(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError) as info:
        create_optimizer("lbfgs", params, lr=0.1)
    assert str(info.value) == "optimizer must be one of adam, adamw, sgd or a callable; got 'lbfgs'"
    register_optimizer("rmsprop", torch.optim.RMSprop)
    with pytest.raises(ValueError) as info:
        TrainConfig(optimizer="lbfgs")
    assert str(info.value) == "optimizer must be one of adam, adamw, rmsprop, sgd; got 'lbfgs'"
    assert TrainConfig(optimizer="rmsprop").optimizer == "rmsprop"
    with pytest.raises(ValueError, match="an optimizer name must be a non-empty string; got ''"):
        register_optimizer("", torch.optim.SGD)
