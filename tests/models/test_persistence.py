import pytest
import torch

from stablenet import create_model, load_model
from stablenet.models.persistence import MODEL_FILE, read_model_metadata, save_model

META = {
    "model": "sll_mlp",
    "model_args": {"width": 64, "depth": 2},
    "num_classes": 10,
    "in_channels": 1,
    "input_size": [8, 8],
    "mean": [0.3],
    "std": [1.0],
    "dataset": "digits",
}


def _model():
    torch.manual_seed(0)
    return create_model("sll_mlp", 10, 1, (8, 8), mean=[0.3], std=[1.0], width=64, depth=2)


def test_round_trip_rebuilds_model_alone(tmp_path):
    model = _model()
    save_model(tmp_path, model, META)
    loaded = load_model(tmp_path)
    assert not loaded.training
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert read_model_metadata(tmp_path / MODEL_FILE)["model_args"] == META["model_args"]
    assert (tmp_path / "model.json").is_file()
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_model(tmp_path, _model(), META)
    path = tmp_path / MODEL_FILE
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(tmp_path)


def test_checkpoint_from_another_model_is_a_clear_error(tmp_path):
    save_model(tmp_path, _model(), {**META, "model_args": {"width": 96, "depth": 2}})
    with pytest.raises(ValueError, match="does not match the model it names: shape mismatch"):
        load_model(tmp_path)
    save_model(tmp_path, _model(), {**META, "model_args": {"width": 64, "depth": 3}})
    with pytest.raises(ValueError, match=r"missing 5\.q_log, 6\.bias, 6\.weight"):
        load_model(tmp_path)


def test_missing_checkpoint_and_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="metadata lacks"):
        save_model(tmp_path, _model(), {"model": "sll_mlp"})


def test_load_run_returns_the_model_its_metadata_and_the_split(trained_digits_run):
    from stablenet import load_run

    run = load_run(trained_digits_run.run_dir, "test")
    assert run.metadata["dataset"] == "digits" and not run.model.training
    assert run.images.shape == (360, 1, 8, 8) and run.labels.shape == (360,)
    train = load_run(trained_digits_run.run_dir, "train")
    assert len(train.images) == 1797 - 360
