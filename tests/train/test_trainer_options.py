"""The trainer's options at scale: EMA, schedules, losses by target radius, gradient clipping, mixed precision,
channels-last, compile, evaluation every k epochs, streaming data, time budgets, and the one-line errors."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch
import yaml

from stablenet import load_model
from stablenet.certify.lipschitz import certify_lipschitz
from stablenet.data import load_dataset
from stablenet.train import TrainConfig, create_schedule, train

BASE = {
    "dataset": "digits",
    "model_args": {"width": 64, "depth": 2, "inner_width": 64},
    "epochs": 2,
    "batch_size": 128,
    "lr": 0.003,
    "device": "cpu",
    "seed": 5,
}


def _config(out, **kw) -> TrainConfig:
    return TrainConfig(**{**BASE, "out": str(out), **kw})


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_ema_weights_are_evaluated_certified_saved_and_resumed(tmp_path):
    result = train(_config(tmp_path / "ema", epochs=3, ema_decay=0.9), progress=False)
    saved = load_model(tmp_path / "ema")
    assert _same_weights(result.model, saved)  # the returned model is the saved, averaged one
    x, y = load_dataset("digits", "test")
    pred, radius = certify_lipschitz(saved, x)
    certified = float(((pred == y) & (radius >= 0.25)).double().mean())
    assert float(_rows(tmp_path / "ema")[-1]["cert_acc@0.25"]) == pytest.approx(certified, abs=1e-12)
    plain = train(_config(tmp_path / "plain", epochs=3), progress=False)
    assert not _same_weights(plain.model, saved)  # the average is not the last iterate

    class Killed(Exception):
        pass

    def die(epoch, _row):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train(_config(tmp_path / "killed", epochs=3, ema_decay=0.9), progress=False, callback=die)
    resumed = train(_config(tmp_path / "killed", epochs=3, ema_decay=0.9), resume=True, progress=False)
    assert _same_weights(resumed.model, saved)


@pytest.mark.parametrize(
    "options",
    [
        {"schedule": "cosine", "warmup_epochs": 1.0},
        {"schedule": "onecycle", "onecycle_pct_start": 0.25},
        {"schedule": "step", "lr_step_epochs": 1, "lr_gamma": 0.5},
        {"schedule": "constant", "lr_scaling": "linear", "reference_batch_size": 64},
    ],
)
def test_the_learning_rate_follows_the_configured_schedule(tmp_path, options):
    config = _config(tmp_path / "run", epochs=3, **options)
    result = train(config, progress=False)
    steps = math.ceil(1437 / 128)  # digits' training split
    peak = 0.003 * (128 / 64 if options.get("lr_scaling") == "linear" else 1.0)
    schedule = create_schedule(
        options["schedule"],
        lr=peak,
        warmup_steps=round(options.get("warmup_epochs", 0.0) * steps),
        pct_start=options.get("onecycle_pct_start", 0.3),
        step_size=options.get("lr_step_epochs", 30) * steps,
        gamma=options.get("lr_gamma", 0.1),
    )
    expected = [schedule((epoch + 1) * steps - 1, 3 * steps) for epoch in range(3)]  # each epoch's last step
    assert [row["lr"] for row in result.metrics] == expected


@pytest.mark.parametrize("loss", ["hinge", "offset_ce", "hkr", "kr"])
def test_losses_train_with_a_target_radius(tmp_path, loss):
    options = {"alpha": 0.9} if loss == "hkr" else {}
    config = _config(tmp_path / loss, loss=loss, target_radius=0.25, loss_options=options)
    result = train(config, progress=False)
    assert all(math.isfinite(row["train_loss"]) for row in result.metrics)


def test_gradient_clipping_bounds_every_step(tmp_path):
    """With SGD (no momentum) at lr 0.1 and the gradient clipped to norm 1e-4, no weight can move more than
    steps * 0.1 * 1e-4 in l2 norm."""
    config = _config(tmp_path / "clip", epochs=1, optimizer="sgd", momentum=0.0, lr=0.1, grad_clip_norm=1e-4)
    clipped = train(config, progress=False)
    torch.manual_seed(config.seed)
    start = train(_config(tmp_path / "none", epochs=1, optimizer="sgd", momentum=0.0, lr=1e-30), progress=False)
    moved = torch.sqrt(
        sum(
            ((a - b).detach() ** 2).sum()
            for a, b in zip(clipped.model.parameters(), start.model.parameters(), strict=True)
        )
    )
    assert 0 < float(moved) <= math.ceil(1437 / 128) * 0.1 * 1e-4 * (1 + 1e-3)


def test_bf16_and_channels_last_train(tmp_path):
    fp32 = train(_config(tmp_path / "fp32", model="lipconvnet", model_args={}, epochs=1), progress=False)
    last = train(
        _config(tmp_path / "cl", model="lipconvnet", model_args={}, epochs=1, channels_last=True), progress=False
    )
    assert last.metrics[0]["train_loss"] == pytest.approx(fp32.metrics[0]["train_loss"], rel=1e-4)
    bf16 = train(_config(tmp_path / "bf16", epochs=1, precision="bf16"), progress=False)
    assert math.isfinite(bf16.metrics[0]["train_loss"])
    assert 0 <= bf16.metrics[0]["cert_acc@0.25"] <= 1  # certified in float64, whatever the training precision


def test_a_compiled_model_trains_to_the_same_loss(tmp_path):
    eager = train(_config(tmp_path / "eager", epochs=1), progress=False)
    compiled = train(_config(tmp_path / "compiled", epochs=1, compile=True), progress=False)
    assert compiled.metrics[0]["train_loss"] == pytest.approx(eager.metrics[0]["train_loss"], rel=1e-4)


def test_evaluation_every_k_epochs_and_always_the_last(tmp_path):
    train(_config(tmp_path / "run", epochs=5, eval_every=2), progress=False)
    rows = _rows(tmp_path / "run")
    assert [row["test_acc"] != "" for row in rows] == [False, True, False, True, True]
    assert all(float(row["images_per_s"]) > 0 and float(row["wall_time_s"]) > 0 for row in rows)


def test_one_concise_log_line_per_epoch(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="stablenet.train.trainer"):
        train(_config(tmp_path / "run", epochs=2), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: loss ") and "img/s" in lines[0] and "{" not in lines[0]


def test_streaming_data_trains_the_same_weights(tmp_path):
    memory = train(_config(tmp_path / "memory", data_streaming=False, crop_padding=1, flip=True), progress=False)
    streamed = train(
        _config(tmp_path / "stream", data_streaming=True, num_workers=0, crop_padding=1, flip=True), progress=False
    )
    assert _same_weights(memory.model, streamed.model)


def test_a_time_budget_plans_the_epochs_and_records_plan_and_wall_time(tmp_path):
    result = train(_config(tmp_path / "budget", epochs=1, time_budget=0.4, eval_every=2), progress=False)
    saved = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())
    plan = saved["plan"]
    assert saved["epochs"] == plan["epochs"] == len(result.metrics) >= 1
    assert plan["budget_min"] == 0.4 and plan["planned_s"] <= 0.4 * 60 and plan["actual_s"] > 0
    assert "planned_wall_time_s" in result.metrics[-1]
    resumed = train(_config(tmp_path / "budget", epochs=1, time_budget=0.4, eval_every=2), resume=True, progress=False)
    assert len(resumed.metrics) == plan["epochs"]  # the plan is kept, not made again


def test_a_budget_shorter_than_one_epoch_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"time budget of .* min is shorter than one measured epoch"):
        train(_config(tmp_path / "short", time_budget=1e-4), progress=False)
    assert not (tmp_path / "short" / "train_state.pt").exists()


def test_bad_options_are_one_line_errors():
    for kw, message in [
        ({"precision": "fp16"}, "precision must be one of fp32, bf16"),
        ({"schedule": "cyclic"}, "schedule must be one of"),
        ({"loss": "focal"}, "loss must be one of"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"grad_clip_norm": 1.0, "sam_rho": 0.05}, "grad_clip_norm cannot be combined with sam_rho"),
        ({"data_streaming": "sometimes"}, "data_streaming must be one of true, false, auto"),
        ({"eval_every": 0}, "eval_every must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            TrainConfig(**kw)
        assert "\n" not in str(info.value)
