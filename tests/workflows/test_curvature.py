"""The Hessian and landscape workflows: the records and files that ``stablenet hessian`` and ``landscape`` write."""

import json

import numpy as np
import pytest

from stablenet.cli import main
from stablenet.curvature.landscape import load_landscape
from stablenet.models.persistence import read_model_metadata, save_model
from stablenet.workflows.curvature import hessian_report, landscape_report

HESSIAN_OPTIONS = dict(
    top_k=2, num_examples=64, seed=1, trace=True, trace_samples=4, density=True, density_runs=2, density_steps=8
)
HESSIAN_FLAGS = ["--top-k", "2", "--num-examples", "64", "--seed", "1", "--trace", "--trace-samples", "4"]
HESSIAN_FLAGS += ["--density", "--density-runs", "2", "--density-steps", "8"]


def _without_times(record):
    if isinstance(record, dict):
        return {k: _without_times(v) for k, v in record.items() if not k.endswith("time_s")}
    return record


def test_hessian_report_is_what_the_cli_writes(trained_digits_run, tmp_path):
    run = trained_digits_run.run_dir
    record = hessian_report(run, **HESSIAN_OPTIONS)
    path = tmp_path / "h.json"
    assert main(["hessian", "--run", str(run), *HESSIAN_FLAGS, "--device", "cpu", "--json", str(path), "--quiet"]) == 0
    written = json.loads(path.read_text())
    assert set(record) == set(written)
    assert set(record["trace"]) == set(written["trace"]) and set(record["density"]) == set(written["density"])
    assert _without_times(record) == _without_times(written)  # the same numbers, bit for bit
    assert record["eigen_time_s"] > 0 and record["trace"]["time_s"] > 0 and record["density"]["time_s"] > 0
    assert record["run"] == str(run) and record["dataset"] == "digits" and record["num_examples"] == 64


def test_hessian_report_without_trace_or_density_has_neither(trained_digits_run):
    record = hessian_report(trained_digits_run.run_dir, num_examples=16, max_iter=5)
    assert "trace" not in record and "density" not in record and len(record["top_eigenvalues"]) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 0}, "top_k must be >= 1; got 0"),
        ({"start": "ones"}, "start must be one of gradient, random; got 'ones'"),
        ({"trace": True, "trace_samples": 1}, "trace_samples must be >= 2"),
        ({"density": True, "density_runs": 0}, "density_runs and density_steps must be >= 1; got 0, 50"),
        ({"num_examples": 0}, "num_examples must be >= 1; got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1; got 0"),
    ],
)
def test_hessian_report_errors_name_the_argument(trained_digits_run, options, message):
    with pytest.raises(ValueError, match=message):
        hessian_report(trained_digits_run.run_dir, **options)


def test_a_checkpoint_without_its_data_set_is_a_clear_error(trained_digits_run, tmp_path):
    metadata = {k: v for k, v in read_model_metadata(trained_digits_run.run_dir).items() if k != "dataset"}
    save_model(tmp_path, trained_digits_run.model, metadata)
    for report in (hessian_report, lambda run: landscape_report(run, tmp_path / "land")):
        with pytest.raises(ValueError, match="does not name its data set"):
            report(tmp_path)


def test_landscape_report_is_what_the_cli_writes(trained_digits_run, tmp_path, capsys):
    run = trained_digits_run.run_dir
    report = landscape_report(run, tmp_path / "lib", dims=1, resolution=5, num_examples=40, progress=False)
    assert report.grid == tmp_path / "lib" / "landscape.npz" and report.plots == [tmp_path / "lib" / "landscape_1d.png"]
    assert (report.model, report.dataset, report.num_examples) == ("sll_mlp", "digits", 40)
    assert report.landscape.computed == 5 and report.time_s > 0
    argv = ["landscape", "--run", str(run), "--dims", "1", "--resolution", "5", "--num-examples", "40"]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert "1-D landscape of sll_mlp on 40 digits test images: 5 new points of 5" in capsys.readouterr().out
    np.testing.assert_array_equal(load_landscape(tmp_path / "cli" / "landscape.npz").loss, report.landscape.loss)
    again = landscape_report(run, tmp_path / "lib", dims=1, resolution=5, num_examples=40, progress=False)
    assert again.landscape.computed == 0  # resumed from the complete grid


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dims": 3}, "dims must be 1 or 2; got 3"),
        ({"resolution": 1}, "resolution must be >= 2; got 1"),
        ({"span": 0.0}, "span must be > 0; got 0.0"),
        ({"num_examples": 0}, "num_examples must be >= 1; got 0"),
    ],
)
def test_landscape_report_errors_name_the_argument(trained_digits_run, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        landscape_report(trained_digits_run.run_dir, tmp_path, **options)
