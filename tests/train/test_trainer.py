import csv

import pytest
import torch
import yaml

from stablenet import load_model
from stablenet.train import TrainConfig, train


def _config(out, **kw):
    base = dict(
        dataset="digits",
        model_args={"width": 64, "depth": 2, "inner_width": 64},
        epochs=4,
        batch_size=128,
        lr=0.003,
        crop_padding=1,
        device="cpu",
        seed=3,
        out=str(out),
    )
    return TrainConfig(**{**base, **kw})


class Killed(Exception):
    pass


def _kill_after_epoch(out, config, epoch):
    """Train ``config`` into ``out`` until the checkpoint of ``epoch`` is written, then die."""

    def die(done, _row):
        if done == epoch:
            raise Killed

    with pytest.raises(Killed):
        train(_config(out, **config), progress=False, callback=die)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    full = train(_config(tmp_path / "full"), progress=False)

    def kill_after_two(epoch, _row):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train(_config(tmp_path / "killed"), progress=False, callback=kill_after_two)
    assert load_model(tmp_path / "killed") is not None  # the epoch-2 checkpoint is usable
    resumed = train(_config(tmp_path / "killed"), resume=True, progress=False)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert [r["test_acc"] for r in resumed.metrics] == [r["test_acc"] for r in full.metrics]
    with open(tmp_path / "killed" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_run_directory_contents_and_learning(tmp_path):
    result = train(_config(tmp_path / "run", epochs=6, crop_padding=0), progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved == _config(tmp_path / "run", epochs=6, crop_padding=0).to_dict()
    assert result.metrics[-1]["test_acc"] > 0.75
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]


def test_refuses_to_overwrite_and_checks_resume_config(tmp_path):
    train(_config(tmp_path / "run", epochs=1), progress=False)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run; resume it"):
        train(_config(tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(ValueError, match="config differs from the saved one in epochs"):
        train(_config(tmp_path / "run", epochs=2), resume=True, progress=False)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="cannot resume"):
        train(_config(tmp_path / "other"), resume=True, progress=False)


def test_noise_augmentation_trains_and_resumes_exactly(tmp_path):
    config = dict(model="lenet", model_args={"width": 4, "hidden": 16}, noise_sigma=0.25, epochs=3, crop_padding=0)
    full = train(_config(tmp_path / "full", **config), progress=False)

    _kill_after_epoch(tmp_path / "killed", config, 1)
    resumed = train(_config(tmp_path / "killed", **config), resume=True, progress=False)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    clean = train(_config(tmp_path / "clean", **{**config, "noise_sigma": 0.0}), progress=False)
    assert not torch.equal(clean.model[1].weight, full.model[1].weight)  # the noise changed training


def test_regularizers_and_sam_from_config_train_and_resume(tmp_path):
    config = dict(
        model="lenet",
        model_args={"width": 4, "hidden": 16},
        loss="ce",
        epochs=2,
        regularizers=[{"name": "activation_decay", "weight": 0.05}],
        sam_rho=0.05,
    )
    full = train(_config(tmp_path / "full", **config), progress=False)
    assert full.metrics[-1]["train_loss"] < full.metrics[0]["train_loss"]

    _kill_after_epoch(tmp_path / "killed", config, 1)
    resumed = train(_config(tmp_path / "killed", **config), resume=True, progress=False)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    plain = train(_config(tmp_path / "plain", **{**config, "regularizers": [], "sam_rho": 0.0}), progress=False)
    assert not torch.equal(plain.model[1].weight, full.model[1].weight)


def test_bad_regularizer_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown regulariser 'smoothness'; accepted: activation_decay"):
        train(_config(tmp_path / "r", regularizers=[{"name": "smoothness", "weight": 1.0}]), progress=False)


def _assert_same_weights(a, b):
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def test_resume_restores_the_global_random_state(tmp_path):
    """Note [exact resume]: hessian_trace draws its Rademacher vectors from torch's global generator, so a
    resumed run must continue that generator where the killed run left it."""
    config = dict(
        model="lenet",
        model_args={"width": 4, "hidden": 16},
        epochs=2,
        regularizers=[{"name": "hessian_trace", "weight": 0.01, "num_samples": 1}],
    )
    full = train(_config(tmp_path / "full", **config), progress=False)

    _kill_after_epoch(tmp_path / "killed", config, 1)
    _assert_same_weights(full, train(_config(tmp_path / "killed", **config), resume=True, progress=False))


def test_kill_within_an_epoch_resumes_from_the_last_step_checkpoint(tmp_path, monkeypatch):
    """Note [exact resume]: with checkpoints within epochs, a run killed mid-epoch resumes at the step it saved
    and ends bit for bit like the uninterrupted run, random crops, flips, noise and regulariser included."""
    from stablenet.train import trainer

    config = dict(
        model="lenet",
        model_args={"width": 4, "hidden": 16},
        epochs=2,
        batch_size=256,
        crop_padding=1,
        flip=True,
        noise_sigma=0.1,
        regularizers=[{"name": "hessian_trace", "weight": 0.01, "num_samples": 1}],
        checkpoint_minutes=1e-9,  # every step
    )
    full = train(_config(tmp_path / "full", **config), progress=False)
    saved = []
    real_save = trainer.save_training_state

    def save_then_die(run_dir, state):
        path = real_save(run_dir, state)
        saved.append((state["epoch"], state.get("partial", {}).get("step")))
        if len(saved) == 4:  # epoch 0 has 6 steps (1437 images): killed after saving step 4 of epoch 0
            raise Killed
        return path

    monkeypatch.setattr(trainer, "save_training_state", save_then_die)
    with pytest.raises(Killed):
        train(_config(tmp_path / "killed", **config), progress=False)
    monkeypatch.setattr(trainer, "save_training_state", real_save)
    assert saved == [(0, 1), (0, 2), (0, 3), (0, 4)]
    resumed = train(_config(tmp_path / "killed", **{**config, "checkpoint_minutes": 0.0}), resume=True, progress=False)
    _assert_same_weights(full, resumed)
    timings = {"time_s", "images_per_s", "wall_time_s"}
    drop_time = [{k: v for k, v in row.items() if k not in timings} for row in full.metrics]
    assert [{k: v for k, v in row.items() if k not in timings} for row in resumed.metrics] == drop_time


def test_checkpoint_minutes_zero_saves_only_at_epoch_ends(tmp_path, monkeypatch):
    from stablenet.train import trainer

    saved = []
    real_save = trainer.save_training_state
    monkeypatch.setattr(trainer, "save_training_state", lambda d, s: (saved.append(s.get("partial")), real_save(d, s)))
    train(_config(tmp_path / "run", epochs=2, checkpoint_minutes=0.0), progress=False)
    assert saved == [None, None]
    with pytest.raises(ValueError, match="checkpoint_minutes must be >= 0; got -1"):
        _config(tmp_path / "bad", checkpoint_minutes=-1)


def test_resumes_a_checkpoint_written_before_step_checkpoints_existed(tmp_path):
    """Older train_state.pt files hold no global generator state and a config without checkpoint_minutes."""
    from stablenet.train.checkpoint import load_training_state, save_training_state

    _kill_after_epoch(tmp_path / "old", {"epochs": 2}, 1)
    state = load_training_state(tmp_path / "old")
    del state["rng"], state["config"]["checkpoint_minutes"]
    save_training_state(tmp_path / "old", state)
    resumed = train(_config(tmp_path / "old", epochs=2), resume=True, progress=False)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2]


def test_a_moved_run_directory_resumes(tmp_path):
    _kill_after_epoch(tmp_path / "here", {}, 2)
    (tmp_path / "here").rename(tmp_path / "there")
    resumed = train(_config(tmp_path / "there"), resume=True, progress=False)
    full = train(_config(tmp_path / "full"), progress=False)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
