"""The EMA of weights: the update against a hand recursion, the swap as a real in-place write (restored bit for bit,
also on errors), evaluation and certificates of exactly the averaged weights (same logits and radii as a fresh model
built from them, no PGD counterexample inside the radii), exact resume from ``state_dict``, buffers, precision,
DDP- and compile-wrapped models, one-line errors."""

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stablenet.certify.attack import pgd_l2
from stablenet.certify.lipschitz import LipschitzCertifier, certify_lipschitz
from stablenet.data import load_dataset
from stablenet.models import create_model
from stablenet.train.ema import WeightEMA, unwrap_model


def _sgd_steps(model, optimizer, ema, steps, features, seed=0):
    """``steps`` optimizer steps on random regression data with ``features`` inputs, updating ``ema`` after each."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, features, generator=gen)
        loss = (model(x) - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()


@pytest.mark.parametrize("warmup", [True, False])
def test_update_follows_the_recursion(warmup):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    ema = WeightEMA(model, decay=0.9, warmup=warmup)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for t in range(25):
        decay = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        assert ema.current_decay() == pytest.approx(decay, rel=1e-15)
        loss = model(torch.randn(4, 5, generator=gen)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        for n, p in model.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach().double()
    shadow = ema.averaged_state_dict()
    for n, value in expected.items():
        torch.testing.assert_close(shadow[n].double(), value, rtol=1e-6, atol=1e-7)
        assert not torch.equal(shadow[n], model.state_dict()[n])  # the average is not the last weights
    assert ema.num_updates == 25


def test_decay_zero_copies_the_weights_and_warmup_reaches_the_decay():
    model = nn.Linear(4, 2)
    ema = WeightEMA(model, decay=0.0)
    _sgd_steps(model, torch.optim.SGD(model.parameters(), lr=0.5), ema, 3, 4)
    for n, v in ema.averaged_state_dict().items():
        assert torch.equal(v, model.state_dict()[n])
    slow = WeightEMA(model, decay=0.999)
    assert slow.current_decay() == 0.1
    slow.num_updates = 8990  # (10 d - 1) / (1 - d): the warm-up's decay reaches d
    assert slow.current_decay() == 0.999


def test_swap_writes_the_parameters_in_place_and_restores_them_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    ema = WeightEMA(model, decay=0.8)
    _sgd_steps(model, optimizer, ema, 10, 6)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    pointers = {n: p.data_ptr() for n, p in params.items()}
    versions = {n: p._version for n, p in params.items()}
    averaged = ema.averaged_state_dict()
    with ema.swapped() as swapped:
        assert swapped is model
        for n, p in model.named_parameters():
            assert p is params[n] and p.data_ptr() == pointers[n]  # the same tensors ...
            assert p._version > versions[n]  # ... written in place
            assert torch.equal(p, averaged[n]) and not torch.equal(p, live[n])
        with pytest.raises(RuntimeError, match="already swapped"):
            ema.swapped().__enter__()
        with pytest.raises(RuntimeError, match="while its weights are swapped"):
            ema.update()
    for n, p in model.named_parameters():
        assert p is params[n] and torch.equal(p, live[n])
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters(), strict=True))
    with pytest.raises(ZeroDivisionError), ema.swapped():
        1 / 0  # noqa: B018
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])


@pytest.fixture(scope="module")
def trained_with_ema():
    """sll_mlp on digits, 60 Adam steps with an EMA: the live model, the EMA and the test images."""
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    model = create_model("sll_mlp", 10, 1, (8, 8), width=64, depth=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ema = WeightEMA(model, decay=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        logits = model(x[idx])
        onehot = F.one_hot(y[idx], 10).to(logits.dtype)
        loss = 0.25 * F.cross_entropy((logits - 1.0 * onehot) / 0.25, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    x_test, _ = load_dataset("digits", "test")
    return model.eval(), ema, x_test[:200]


@pytest.mark.parametrize("arithmetic", ["float64", "native"])
def test_certificates_are_of_exactly_the_evaluated_averaged_weights(trained_with_ema, arithmetic):
    model, ema, x = trained_with_ema
    fresh = create_model("sll_mlp", 10, 1, (8, 8), width=64, depth=2)
    fresh.load_state_dict(ema.averaged_state_dict())
    fresh.eval()
    with torch.no_grad():
        live_logits = model(x)  # fills the layers' eval caches with the live weights
        expected_logits = fresh(x)
    expected_pred, expected_radius = certify_lipschitz(fresh, x, arithmetic=arithmetic)
    assert not torch.equal(live_logits, expected_logits)  # the averaged model is another model
    with ema.swapped() as averaged:
        with torch.no_grad():
            logits = averaged(x)
        certifier = LipschitzCertifier(averaged, input_shape=tuple(x.shape[1:]), arithmetic=arithmetic)
        pred, radius = certifier(x)
        assert torch.equal(logits, expected_logits)
        assert torch.equal(pred, expected_pred) and torch.equal(radius, expected_radius)
        certified = radius > 0
        assert certified.sum() > 100, "the averaged model should certify most points"
        # Attack at the edge of each certified ball, in the certified arithmetic.
        network = copy.deepcopy(averaged).double() if arithmetic == "float64" else averaged
        xs = x.to(next(network.parameters()).dtype)
        _, flipped = pgd_l2(
            network,
            xs[certified],
            pred[certified],
            0.99 * radius[certified].to(xs.dtype),
            steps=30,
            restarts=2,
            generator=torch.Generator().manual_seed(0),
        )
        assert not flipped.any()
    with torch.no_grad():
        assert torch.equal(model(x), live_logits)  # swapped back: no stale cache either way
    with pytest.raises(RuntimeError, match="changed after the certifier computed its bounds"):
        certifier(x)  # a certificate of the averaged weights is refused for the live ones


def test_exact_resume_from_state_dict():
    torch.manual_seed(0)
    model = nn.Linear(7, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    ema = WeightEMA(model, decay=0.95)
    _sgd_steps(model, optimizer, ema, 6, 7, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}, buffer)
    _sgd_steps(model, optimizer, ema, 6, 7, seed=2)  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other = nn.Linear(7, 4)
    other_optimizer = torch.optim.Adam(other.parameters(), lr=0.02)
    resumed = WeightEMA(other, decay=0.95)
    other.load_state_dict(saved["model"])
    other_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["ema"])
    assert resumed.num_updates == 6
    _sgd_steps(other, other_optimizer, resumed, 6, 7, seed=2)
    assert resumed.num_updates == ema.num_updates == 12
    for n, v in ema.averaged_state_dict().items():
        assert torch.equal(resumed.averaged_state_dict()[n], v)


def test_load_state_dict_refuses_another_model_or_decay():
    ema = WeightEMA(nn.Linear(3, 2), decay=0.9)
    state = ema.state_dict()
    with pytest.raises(ValueError, match=r"this EMA has decay 0\.99"):
        WeightEMA(nn.Linear(3, 2), decay=0.99).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['bias'\]"):
        WeightEMA(nn.Linear(3, 2, bias=False), decay=0.9).load_state_dict(state)
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        WeightEMA(nn.Linear(4, 2), decay=0.9).load_state_dict(state)


def test_buffers_are_the_models_and_tied_weights_are_averaged_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = WeightEMA(model, decay=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        loss = model(torch.randn(16, 4, generator=gen)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    averaged = ema.averaged_state_dict()
    live = model.state_dict()
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(averaged[name], live[name])  # Note [EMA buffers]
    assert averaged["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(averaged["0.weight"], averaged["2.weight"])
    assert not torch.equal(averaged["0.weight"], live["0.weight"])
    with ema.swapped():
        assert model[2].weight is model[0].weight and torch.equal(model[2].weight, averaged["2.weight"])


@pytest.mark.parametrize(
    ("param_dtype", "shadow_dtype", "expected"),
    [
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.float32, torch.float64, torch.float64),
    ],
)
def test_shadow_precision(param_dtype, shadow_dtype, expected):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(param_dtype)
    ema = WeightEMA(model, decay=0.9, dtype=shadow_dtype)
    assert all(s.dtype == expected for s in ema.state_dict()["shadow"].values())
    reference = {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # the first update's decay is 0.1
    for n, v in ema.state_dict()["shadow"].items():
        exact = 0.1 * reference[n] + 0.9 * dict(model.named_parameters())[n].detach().double()
        torch.testing.assert_close(v.double(), exact, rtol=1e-6 if expected == torch.float32 else 1e-14, atol=0)
    averaged = ema.averaged_state_dict()
    with ema.swapped():
        for n, p in model.named_parameters():
            assert p.dtype == param_dtype and torch.equal(p, averaged[n])


@pytest.fixture
def process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _wrapped_matches(wrapper, model):
    """The EMA of ``wrapper`` averages ``model``'s parameters, and the wrapper's forward sees the swap."""
    ema = WeightEMA(wrapper, decay=0.5)
    assert ema.module is model and unwrap_model(wrapper) is model
    assert set(ema.state_dict()["shadow"]) == {n for n, _ in model.named_parameters()}
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = F.cross_entropy(wrapper(x), torch.arange(16) % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(ema.averaged_state_dict())
    model.eval(), fresh.eval()
    with torch.no_grad():
        live = wrapper(x)
        with ema.swapped():
            assert torch.equal(wrapper(x), fresh(x))
        assert torch.equal(wrapper(x), live)


def test_ddp_wrapped_model(process_group):
    torch.manual_seed(0)
    model = create_model("sll_mlp", 10, 1, (8, 8), width=64, depth=2)
    _wrapped_matches(nn.parallel.DistributedDataParallel(model), model)


def test_compiled_model():
    torch.manual_seed(0)
    model = create_model("sll_mlp", 10, 1, (8, 8), width=64, depth=2)
    _wrapped_matches(torch.compile(model, backend="eager"), model)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: WeightEMA(nn.Linear(2, 2), decay=1.0), r"ema decay must be in \[0, 1\); got 1.0"),
        (lambda: WeightEMA(nn.Linear(2, 2), decay=-0.1), r"ema decay must be in \[0, 1\)"),
        (lambda: WeightEMA(nn.Linear(2, 2), decay=0.9, dtype=torch.int32), "floating-point dtype"),
        (lambda: WeightEMA(nn.ReLU(), decay=0.9), "no floating-point parameters"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
