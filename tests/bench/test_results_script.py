"""Issue 19's recipes parse and train a step, and ``benchmarks/results.py`` runs end to end on digits (``--fast``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablenet.certify.records import read_records
from stablenet.data import DatasetInfo, dataset_info, register_dataset
from stablenet.data import datasets as datasets_module
from stablenet.train import train
from stablenet.train.config import apply_overrides, load_config
from stablenet.workflows.report import certified_accuracy, format_radius

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "results.py"
spec = importlib.util.spec_from_file_location("results_script", SCRIPT)
results = importlib.util.module_from_spec(spec)
sys.modules["results_script"] = results  # dataclasses look their module up while the class is made
spec.loader.exec_module(results)


@pytest.fixture
def tiny_copies(monkeypatch):
    """``tiny-NAME``: 16 random images shaped like each recipe's data set (registry restored afterwards)."""
    monkeypatch.setattr(datasets_module, "_REGISTRY", dict(datasets_module._REGISTRY))
    for name in ("mnist", "cifar10"):
        info = dataset_info(name)
        generator = torch.Generator().manual_seed(0)

        def load(split, root, info=info, generator=generator):
            images = torch.rand(16, info.in_channels, *info.input_size, generator=generator)
            return images, torch.arange(16) % info.num_classes

        register_dataset(DatasetInfo(f"tiny-{name}", info.num_classes, info.in_channels, info.input_size,
                                     info.mean, info.std), load)  # fmt: skip


#: The full SLL-S network takes about 20 s per step here: the default run trains a narrow copy of its recipe.
NARROW_SLL_S = {"model_args.width": 8, "model_args.n_conv": 1, "model_args.n_dense": 1, "model_args.dense_inner": 32}


def _one_step(row: str, tmp_path: Path, narrow: bool) -> None:
    config = load_config(ROOT / results.ROWS[row].config)
    assert config.dataset in ("mnist", "cifar10") and Path(config.out).name == row
    small = {"dataset": f"tiny-{config.dataset}", "data_root": None, "epochs": 1, "batch_size": 16, "time_budget": 0.0}
    small |= {"warmup_epochs": 0.0, "device": "cpu", "compile": False, "precision": "fp32", "out": str(tmp_path)}
    if narrow and config.model == "sll_s" and not config.model_args:
        small |= NARROW_SLL_S
    result = train(apply_overrides(config, small), progress=False)
    assert len(result.metrics) == 1 and result.metrics[0]["train_loss"] == result.metrics[0]["train_loss"]  # finite


@pytest.mark.parametrize("row", list(results.ROWS))
def test_each_recipe_parses_and_trains_a_step(row, tiny_copies, tmp_path):
    _one_step(row, tmp_path, narrow=True)


@pytest.mark.slow
@pytest.mark.parametrize("row", [r for r, spec in results.ROWS.items() if "sll-s" in spec.config or "gpu" in r])
def test_the_full_sll_s_recipes_train_a_step(row, tiny_copies, tmp_path):
    _one_step(row, tmp_path, narrow=False)


def test_fast_rows_run_end_to_end_on_digits(tmp_path):
    for row in ("mnist-lipschitz", "mnist-smoothing-s050"):
        command = [sys.executable, str(SCRIPT), row, "--fast", "--quiet", "--out", str(tmp_path / "out")]
        done = subprocess.run([*command, "--runs", str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((tmp_path / "out" / f"{row}-fast.json").read_text())
        assert record["fast"] and record["dataset"] == "digits" and record["epochs"] == 2
        assert set(record["methods"]) == set(results.ROWS[row].methods)
        assert {"commit", "torch", "device", "command"} <= set(record["provenance"])
        for method, values in record["methods"].items():
            records = read_records(tmp_path / "runs" / row / f"certify_{method}.jsonl")
            assert values["examples"] == len(records) == 40  # the same images for every method
            radii = results.ROWS[row].radii or (0.25, 0.5, 1.0, 1.5)  # smoothing rows: the published radii
            expected = certified_accuracy(records, (0.0, *radii))
            assert list(values["certified"]) == [format_radius(r) for r in radii]
            assert [values["clean"], *values["certified"].values()] == pytest.approx(list(expected), abs=0)
        printed = done.stdout.splitlines()
        assert len(printed) == len(record["methods"]) and printed[0].startswith(f"{row} ")


def test_an_unknown_row_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "nope"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr
