import pytest

from stablenet.train.config import TrainConfig, apply_overrides, load_config, parse_override_args


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\nepochs: 3\nmodel_args:\n  width: 96\n  depth: 2\nlr: 1\n")
    config = load_config(path, {"epochs": 5, "model_args.depth": 4})
    assert config.epochs == 5 and config.model_args == {"width": 96, "depth": 4}
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_parse_override_args():
    assert parse_override_args(["--epochs", "5", "--lr=0.1", "--flip", "true", "--model_args.width", "64"]) == {
        "epochs": 5,
        "lr": 0.1,
        "flip": True,
        "model_args.width": 64,
    }
    with pytest.raises(ValueError, match="needs a value"):
        parse_override_args(["--epochs"])
    with pytest.raises(ValueError, match="expected --key value pairs"):
        parse_override_args(["epochs", "3"])


@pytest.mark.parametrize(
    "values,message",
    [
        ({"epoch": 3}, "unknown config key(s) epoch; accepted: batch_size"),
        ({"epochs": "ten"}, "config key 'epochs' must be int; got 'ten'"),
        ({"epochs": 2.5}, "config key 'epochs' must be int"),
        ({"flip": 1}, "config key 'flip' must be bool"),
        ({"epochs": 0}, "epochs must be >= 1; got 0"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of adam, adamw, sgd; got 'lbfgs'"),
        ({"model_args": [1]}, "config key 'model_args' must be a mapping"),
        ({"device": "tpu"}, "device must be 'auto'"),
    ],
)
def test_bad_values_one_line_errors(values, message):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(values)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_files_and_nested_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ValueError, match="only model_args takes nested keys"):
        apply_overrides(TrainConfig(), {"optimizer.lr": 1})
