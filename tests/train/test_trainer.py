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
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(_config(tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(ValueError, match="config differs from the saved one in epochs"):
        train(_config(tmp_path / "run", epochs=2), resume=True, progress=False)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="cannot resume"):
        train(_config(tmp_path / "other"), resume=True, progress=False)


def test_noise_augmentation_trains_and_resumes_exactly(tmp_path):
    config = dict(model="lenet", model_args={"width": 4, "hidden": 16}, noise_sigma=0.25, epochs=3, crop_padding=0)
    full = train(_config(tmp_path / "full", **config), progress=False)

    def kill_after_one(epoch, _row):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train(_config(tmp_path / "killed", **config), progress=False, callback=kill_after_one)
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

    def kill_after_one(epoch, _row):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train(_config(tmp_path / "killed", **config), progress=False, callback=kill_after_one)
    resumed = train(_config(tmp_path / "killed", **config), resume=True, progress=False)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    plain = train(_config(tmp_path / "plain", **{**config, "regularizers": [], "sam_rho": 0.0}), progress=False)
    assert not torch.equal(plain.model[1].weight, full.model[1].weight)


def test_bad_regularizer_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown regulariser 'smoothness'; accepted: activation_decay"):
        train(_config(tmp_path / "r", regularizers=[{"name": "smoothness", "weight": 1.0}]), progress=False)
