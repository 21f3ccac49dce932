"""SAM / ASAM against hand-computed updates, bit-for-bit identity at rho = 0, and the known pitfalls."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stablenet.curvature.sam import ASAM, SAM, sam_bn_guard, sam_step

DT = torch.float64


# ---------------------------------------------------------------------------------------------- quadratic
def _quadratic(seed=0, n1=3, shape2=(2, 2)):
    """L(v) = ½ vᵀAv + bᵀv with v = cat(w1, w2.flatten()); two parameters so the norm is a global one."""
    g = torch.Generator().manual_seed(seed)
    n = n1 + shape2[0] * shape2[1]
    m = torch.randn(n, n, generator=g, dtype=DT)
    a = m @ m.T + torch.eye(n, dtype=DT)
    b = torch.randn(n, generator=g, dtype=DT)
    w1 = torch.randn(n1, generator=g, dtype=DT)
    w2 = torch.randn(*shape2, generator=g, dtype=DT)
    return a, b, w1, w2


def _loss(a, b, w1, w2):
    v = torch.cat([w1, w2.flatten()])
    return 0.5 * v @ a @ v + b @ v


def _closure(opt, a, b, w1, w2, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        loss = _loss(a, b, w1, w2)
        loss.backward()
        return loss

    return closure


def _grad(a, b, v):
    return a @ v + b


@pytest.mark.parametrize("api", ["closure", "first_second"])
def test_sam_matches_hand_formula(api):
    a, b, w1_0, w2_0 = _quadratic()
    rho, lr = 0.07, 0.1
    w1, w2 = nn.Parameter(w1_0.clone()), nn.Parameter(w2_0.clone())
    opt = SAM([w1, w2], torch.optim.SGD, rho=rho, lr=lr)
    if api == "closure":
        loss = opt.step(_closure(opt, a, b, w1, w2))
        assert torch.allclose(loss, _loss(a, b, w1_0, w2_0), rtol=0, atol=1e-12)
    else:
        _loss(a, b, w1, w2).backward()
        opt.first_step(zero_grad=True)
        _loss(a, b, w1, w2).backward()
        opt.second_step()

    v = torch.cat([w1_0, w2_0.flatten()])
    g = _grad(a, b, v)
    eps = rho * g / torch.linalg.norm(g)
    expected = v - lr * _grad(a, b, v + eps)
    got = torch.cat([w1.detach(), w2.detach().flatten()])
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    # The perturbation matters at this tolerance: plain SGD is far away.
    assert not torch.allclose(got, v - lr * g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("named", [False, True])
def test_asam_matches_hand_formula(named):
    """ε = ρ T² g / ‖T g‖ with T = |w| + η for weights; biases get T = 1 when names are known (Kwon et al.)."""
    a, b, w1_0, w2_0 = _quadratic(seed=1)
    rho, eta, lr = 0.5, 0.01, 0.05
    bias, weight = nn.Parameter(w1_0.clone()), nn.Parameter(w2_0.clone())
    params = [("layer.bias", bias), ("layer.weight", weight)] if named else [bias, weight]
    opt = ASAM(params, torch.optim.SGD, rho=rho, eta=eta, lr=lr)
    opt.step(_closure(opt, a, b, bias, weight))

    v = torch.cat([w1_0, w2_0.flatten()])
    t = v.abs() + eta
    if named:
        t[: w1_0.numel()] = 1.0
    g = _grad(a, b, v)
    eps = rho * t**2 * g / torch.linalg.norm(t * g)
    expected = v - lr * _grad(a, b, v + eps)
    got = torch.cat([bias.detach(), weight.detach().flatten()])
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_asam_is_sam_adaptive():
    a, b, w1_0, w2_0 = _quadratic(seed=2)
    results = []
    for make in (
        lambda ps: ASAM(ps, torch.optim.SGD, rho=0.3, eta=0.02, lr=0.1),
        lambda ps: SAM(ps, torch.optim.SGD, rho=0.3, adaptive=True, eta=0.02, lr=0.1),
    ):
        w1, w2 = nn.Parameter(w1_0.clone()), nn.Parameter(w2_0.clone())
        opt = make([w1, w2])
        for _ in range(3):
            opt.step(_closure(opt, a, b, w1, w2))
        results.append(torch.cat([w1.detach(), w2.detach().flatten()]))
    assert torch.equal(results[0], results[1])
    assert ASAM([nn.Parameter(w1_0.clone())], torch.optim.SGD, lr=0.1).param_groups[0]["sam_rho"] == 0.5


def test_weight_decay_applied_once():
    """Coupled SGD decay: w' = w − lr (∇L(w + ε) + λ w) with ε from the raw gradient ∇L(w)."""
    a, b, w1_0, w2_0 = _quadratic(seed=3)
    rho, lr, wd = 0.1, 0.05, 0.3
    w1, w2 = nn.Parameter(w1_0.clone()), nn.Parameter(w2_0.clone())
    opt = SAM([w1, w2], torch.optim.SGD, rho=rho, lr=lr, weight_decay=wd)
    opt.step(_closure(opt, a, b, w1, w2))

    v = torch.cat([w1_0, w2_0.flatten()])
    g = _grad(a, b, v)
    eps = rho * g / torch.linalg.norm(g)
    expected = v - lr * (_grad(a, b, v + eps) + wd * v)
    got = torch.cat([w1.detach(), w2.detach().flatten()])
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_zero_gradient_gives_no_perturbation():
    w = nn.Parameter(torch.ones(3, dtype=DT))
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.1)
    seen = []

    def closure():
        seen.append(w.detach().clone())
        loss = (w * 0).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(seen[1], seen[0])
    assert torch.equal(w.detach(), torch.ones(3, dtype=DT))


def test_weights_restored_exactly_and_frozen_params_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    mid = []

    def closure():
        mid.append([p.detach().clone() for p in model.parameters()])
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    # lr = 0: the step must give back w bit for bit (restored from a copy, not by subtracting ε).
    for p, w in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), w)
    assert torch.equal(mid[1][1], frozen)  # no gradient, no perturbation
    assert not torch.equal(mid[1][0], mid[0][0])


# --------------------------------------------------------------------------------------- rho = 0 identity
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    ("base", "kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
)
@pytest.mark.parametrize("api", ["closure", "first_second", "sam_step"])
def test_rho_zero_is_base_optimizer_bit_for_bit(base, kwargs, api):
    x, y = _data()
    ref = _mlp()
    ref_opt = base(ref.parameters(), **kwargs)
    model = _mlp()
    opt = SAM(model.parameters(), base, rho=0.0, **kwargs)
    for _ in range(5):
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()

        if api == "closure":

            def closure():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        elif api == "first_second":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step()
        else:
            sam_step(model, opt, lambda: F.cross_entropy(model(x), y))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_closure_api_equals_first_second_api_and_sam_step():
    x, y = _data()
    models = [_mlp() for _ in range(3)]
    opts = [SAM(m.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9) for m in models]
    for _ in range(3):
        m, opt = models[0], opts[0]

        def closure(m=m):
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss

        opt.step(closure)

        m, opt = models[1], opts[1]
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(m(x), y).backward()
        opt.second_step(zero_grad=True)

        m, opt = models[2], opts[2]
        sam_step(m, opt, lambda m=m: F.cross_entropy(m(x), y))
    for p, q, r in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(p, r)
    # And SAM did something different from the base optimiser.
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(models[0].parameters(), ref.parameters(), strict=True))


def test_first_step_twice_raises():
    w = nn.Parameter(torch.ones(2))
    opt = SAM([w], torch.optim.SGD, lr=0.1)
    (w**2).sum().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.first_step()


# ------------------------------------------------------------------------------------------------ BatchNorm
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("how", ["sam_step", "manual_guard"])
def test_bn_running_stats_updated_once(momentum, how):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=momentum), nn.ReLU(), nn.Linear(6, 2))
    ref = copy.deepcopy(model)
    unguarded = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    ref(x)  # one plain forward on the batch, train mode
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    if how == "sam_step":
        sam_step(model, opt, lambda: F.mse_loss(model(x), y))
    else:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with sam_bn_guard(model):
            F.mse_loss(model(x), y).backward()
        opt.second_step()
    bn, bn_ref = model[1], ref[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    # Without the guard the second forward (at w + ε) would move the statistics again.
    u_opt = SAM(unguarded.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)

    def closure():
        loss = F.mse_loss(unguarded(x), y)
        loss.backward()
        return loss

    u_opt.step(closure)
    assert int(unguarded[1].num_batches_tracked) == 2
    assert not torch.equal(unguarded[1].running_mean, bn_ref.running_mean)


def test_bn_guard_restores_on_error_and_ignores_plain_models():
    bn = nn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="boom"), sam_bn_guard(bn):
        bn(torch.randn(5, 3))
        raise RuntimeError("boom")
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert int(bn.num_batches_tracked) == 0
    with sam_bn_guard(nn.Linear(2, 2)):
        pass


# -------------------------------------------------------------------------------- state, groups, schedulers
def _steps(model, opt, x, y, n):
    for _ in range(n):
        sam_step(model, opt, lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize(
    ("base", "kwargs"), [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 1e-2})]
)
def test_state_dict_round_trip(base, kwargs):
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), base, rho=0.1, **kwargs)
    _steps(model, opt, x, y, 2)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"], "base optimiser state missing from the state dict"
    assert sd["param_groups"][0]["sam_rho"] == 0.1

    clone = copy.deepcopy(model)
    opt2 = SAM(clone.parameters(), base, rho=0.3, **kwargs)
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.state is opt2.base_optimizer.state
    assert opt2.param_groups[0]["sam_rho"] == 0.1
    _steps(model, opt, x, y, 2)
    _steps(clone, opt2, x, y, 2)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_plain_optimizer_state_dict():
    x, y = _data()
    model = _mlp()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain.step()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.5, momentum=0.9)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["sam_rho"] == 0.2
    assert opt.param_groups[0]["lr"] == 0.1
    _steps(model, opt, x, y, 1)


def test_deepcopy_keeps_sharing():
    opt = SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    dup = copy.deepcopy(opt)
    assert dup.param_groups is dup.base_optimizer.param_groups
    assert dup.param_groups is not opt.param_groups


@pytest.mark.parametrize("api", ["sam_step", "closure"])
def test_scheduler_drives_base_lr(api):
    x, y = _data()
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            if api == "sam_step":
                _steps(model, opt, x, y, 1)
            else:

                def closure():
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    # The base step uses the scheduled lr: an lr of 0 freezes the weights.
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _steps(model, opt, x, y, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_onecycle_scheduler_sees_momentum():
    opt = SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    assert opt.base_optimizer.param_groups[0]["momentum"] != 0.9  # cycled by the scheduler, on the shared groups


def test_per_group_options_and_add_param_group():
    a, b, w1_0, w2_0 = _quadratic(seed=4)
    w1, w2 = nn.Parameter(w1_0.clone()), nn.Parameter(w2_0.clone())
    opt = SAM([{"params": [w1], "sam_rho": 0.0}], torch.optim.SGD, rho=0.1, lr=0.1)
    opt.add_param_group({"params": [w2]})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["sam_rho"] == 0.1
    seen = []

    def closure():
        seen.append((w1.detach().clone(), w2.detach().clone()))
        loss = _loss(a, b, w1, w2)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(seen[1][0], w1_0)  # group with rho = 0 not perturbed
    v = torch.cat([w1_0, w2_0.flatten()])
    g = _grad(a, b, v)
    eps2 = (0.1 * g / torch.linalg.norm(g))[w1_0.numel() :].reshape(w2_0.shape)  # global norm
    assert torch.allclose(seen[1][1], w2_0 + eps2, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="sam_rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "sam_rho": -1.0})


# ------------------------------------------------------------------------------------------------------ AMP
def _amp_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, x, y


def test_grad_scaler_matches_unscaled_step():
    model, x, y = _amp_setup()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        sam_step(model, opt, lambda: F.mse_loss(model(x), y), scaler=scaler)
        scaler.update()
        sam_step(ref, ref_opt, lambda: F.mse_loss(ref(x), y))
    assert scaler.get_scale() == 2.0**10
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _poisoning_closure(model, x, y, scaler, poison_calls, calls):
    def closure():
        calls.append(1)
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if len(calls) in poison_calls:
            next(iter(model.parameters())).grad[0, 0] = float("inf")
        return loss

    return closure


@pytest.mark.parametrize("poison", [(1, 2), (2,)])
def test_grad_scaler_skips_non_finite_step(poison):
    """Inf at the ascent (and hence at w again), or only at w + ε: the weights stay at w, the scale backs off."""
    model, x, y = _amp_setup()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls, seen = [], []
    closure = _poisoning_closure(model, x, y, scaler, poison, calls)

    def spy():
        seen.append([p.detach().clone() for p in model.parameters()])
        return closure()

    opt.step(spy, scaler=scaler)
    scaler.update()
    assert len(calls) == 2  # the second pass runs (keeps DDP ranks' collectives matched)
    for p, w in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), w)
    assert scaler.get_scale() == 2.0**9
    if 1 in poison:  # non-finite ascent gradient: no perturbation
        assert all(torch.equal(a, b) for a, b in zip(seen[1], before, strict=True))
    else:
        assert not all(torch.equal(a, b) for a, b in zip(seen[1], before, strict=True))


def test_non_finite_ascent_falls_back_to_gradient_at_w():
    """If only the ascent gradient overflows, the second pass at w decides (here finite): a plain step from w."""
    model, x, y = _amp_setup()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.step(_poisoning_closure(model, x, y, scaler, (1,), []), scaler=scaler)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.mse_loss(ref(x), y).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ DDP
class _FakeDDP(nn.Module):
    """Exposes ``no_sync`` like DistributedDataParallel and records whether each forward ran inside it."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.entered = 0
        self.inside = False
        self.forwards: list[bool] = []

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x):
        self.forwards.append(self.inside)
        return self.module(x)


@pytest.mark.parametrize(("rho", "expected"), [(0.1, [True, False]), (0.0, [False])])
def test_sam_step_uses_no_sync_for_the_ascent_only(rho, expected):
    x, y = _data()
    model = _FakeDDP(_mlp())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    sam_step(model, opt, lambda: F.cross_entropy(model(x), y))
    assert model.forwards == expected
    assert model.entered == (1 if rho > 0 else 0)


def _ddp_sam_matches_plain_sam() -> None:
    x, y = _data()
    plain = _mlp()
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    syncing = []

    def loss_fn():
        syncing.append(ddp.require_backward_grad_sync)
        return F.cross_entropy(ddp(x), y)

    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    ref_opt = SAM(plain.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    for _ in range(2):
        sam_step(ddp, opt, loss_fn)
        sam_step(plain, ref_opt, lambda: F.cross_entropy(plain(x), y))
    assert syncing == [False, True, False, True]
    for p, q in zip(ddp.module.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_real_ddp_single_process(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    start = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if time.perf_counter() - start > 5:
            pytest.skip("process group initialisation is too slow here")
        _ddp_sam_matches_plain_sam()
    finally:
        # The DDP model's reducer holds the process group: it must be gone before the group is destroyed, or
        # its destructor can join gloo threads that no longer run (a hang seen in about one full run in five).
        gc.collect()
        dist.destroy_process_group()


TWO_RANK_SCRIPT = """
import copy
import torch
import torch.distributed as dist
import torch.nn.functional as F
from stablenet.curvature.sam import SAM, sam_step

dist.init_process_group("gloo")
rank, rho, lr = dist.get_rank(), 0.1, 0.1
torch.manual_seed(0)
model = torch.nn.Linear(4, 3).double()
x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
start = copy.deepcopy(model)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = SAM(ddp.parameters(), torch.optim.SGD, rho=rho, lr=lr)
sam_step(ddp, opt, lambda: F.cross_entropy(ddp(x[rank::2]), y[rank::2]))

# By hand: each rank's ascent along its own half's gradient, the descent along the mean of the two halves'
# gradients at their own perturbed points (Foret et al.'s m-sharpness with m = 4).
def grad(params, half):
    w, b = (p.detach().requires_grad_() for p in params)
    return torch.autograd.grad(F.cross_entropy(F.linear(x[half::2], w, b), y[half::2]), (w, b))

w0 = [p.detach() for p in start.parameters()]
descent = [torch.zeros_like(p) for p in w0]
for half in range(2):
    g = grad(w0, half)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    at = [p + rho * gi / norm for p, gi in zip(w0, g)]
    descent = [d + gi / 2 for d, gi in zip(descent, grad(at, half))]
for p, p0, d in zip(model.parameters(), w0, descent):
    torch.testing.assert_close(p.detach(), p0 - lr * d, rtol=0, atol=1e-12)
# The reducer holds the process group: gone before the group is (as in test_real_ddp_single_process), or a rank
# can abort at exit ("terminate called without an active exception", seen once in a full run).
del opt, ddp
import gc
gc.collect()
dist.destroy_process_group()
"""


def test_two_process_ddp_sam_is_m_sharpness_by_hand(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists() or not torch.distributed.is_available():
        pytest.skip("torchrun is not installed")
    (tmp_path / "two_ranks.py").write_text(TWO_RANK_SCRIPT)
    args = [torchrun, "--standalone", "--nproc_per_node", "2", str(tmp_path / "two_ranks.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -0.1}, "rho must be a finite number >= 0; got -0.1"),
        ({"rho": float("nan")}, "rho must be"),
        ({"eta": -1.0}, "eta must be a finite number >= 0"),
        ({"base_optimizer": "sgd"}, "base_optimizer must be an Optimizer class or a factory"),
        ({"base_optimizer": torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)}, "base_optimizer must be"),
        ({"base_optimizer": lambda groups, **kw: [groups]}, "must return a torch.optim.Optimizer; got list"),
        (
            {"base_optimizer": lambda groups, **kw: torch.optim.SGD([nn.Parameter(torch.ones(1))], **kw)},
            "over the param_groups it is given",
        ),
    ],
)
def test_bad_input(kwargs, match):
    args = {"base_optimizer": torch.optim.SGD, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        SAM([nn.Parameter(torch.ones(2))], **args)


def test_step_without_closure_explains_contract():
    opt = SAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"needs a closure .* or call first_step"):
        opt.step()


def test_factory_base_optimizer():
    a, b, w1_0, w2_0 = _quadratic(seed=5)
    results = []
    for base in (torch.optim.SGD, functools.partial(torch.optim.SGD, momentum=0.5)):
        w1, w2 = nn.Parameter(w1_0.clone()), nn.Parameter(w2_0.clone())
        kwargs = {"lr": 0.1} if base is not torch.optim.SGD else {"lr": 0.1, "momentum": 0.5}
        opt = SAM([w1, w2], base, **kwargs)
        for _ in range(2):
            opt.step(_closure(opt, a, b, w1, w2))
        results.append(torch.cat([w1.detach(), w2.detach().flatten()]))
    assert torch.equal(results[0], results[1])
