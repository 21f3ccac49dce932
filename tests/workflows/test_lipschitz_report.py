"""The Lipschitz bounds workflow: the record that ``stablenet lipschitz --json`` writes."""

import json
import math

import pytest

from stablenet.cli import main
from stablenet.models.persistence import read_model_metadata, save_model
from stablenet.spectral import lipschitz_upper_bound
from stablenet.workflows.lipschitz import LipschitzReport, lipschitz_report


def test_registry_model_report_equals_the_cli_json(tmp_path, capsys):
    report = lipschitz_report(model="sll_mlp", input_size=8, num_inputs=8, seed=3)
    assert isinstance(report, LipschitzReport)
    assert report.input_shape == (1, 8, 8) and report.inputs == "8 uniform random inputs in [0, 1]"
    assert 0 < report.lower <= report.upper and report.upper >= math.prod(b for _, b in report.layers)
    path = tmp_path / "bounds.json"
    args = ["lipschitz", "--model", "sll_mlp", "--input-size", "8", "--num-inputs", "8", "--seed", "3"]
    assert main([*args, "--json", str(path), "--quiet"]) == 0
    assert json.loads(path.read_text()) == report.to_dict()
    assert f"lower bound (empirical, {report.inputs}): {report.lower:.6g}" in capsys.readouterr().out


def test_run_report_equals_the_cli_json(trained_digits_run, tmp_path):
    run = trained_digits_run.run_dir
    report = lipschitz_report(run, num_inputs=16)
    assert report.inputs == "16 digits test images" and report.input_shape == (1, 8, 8)
    assert report.upper == lipschitz_upper_bound(trained_digits_run.model, input_shape=(1, 8, 8))
    path = tmp_path / "bounds.json"
    assert main(["lipschitz", "--run", str(run), "--num-inputs", "16", "--json", str(path), "--quiet"]) == 0
    assert json.loads(path.read_text()) == report.to_dict()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "give exactly one of run_dir and model"),
        (("runs/x",), {"model": "sll_mlp"}, "give exactly one of run_dir and model"),
        ((), {"model": "sll_mlp", "num_inputs": 0}, "num_inputs must be >= 1; got 0"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lipschitz_report(*args, **kwargs)


def test_a_checkpoint_without_its_data_set_is_a_clear_error(trained_digits_run, tmp_path):
    metadata = {k: v for k, v in read_model_metadata(trained_digits_run.run_dir).items() if k != "dataset"}
    save_model(tmp_path, trained_digits_run.model, metadata)
    with pytest.raises(ValueError, match="does not name its data set; pass model for random inputs"):
        lipschitz_report(tmp_path)
