"""benchmarks/explore_mnist_10min.sh (issue 19's exploration): its variants' settings reach the trainer (FAST=1: the
digits smoke run), each writes its row with the change recorded, and an unknown variant is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *variants: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAST": "1", "PYTHON": sys.executable, "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path)}
    return subprocess.run(
        ["bash", "benchmarks/explore_mnist_10min.sh", *variants],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_every_variant_trains_and_writes_its_row(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/mnist-lipschitz-10min-fast.json")}
    assert sorted(rows) == sorted(
        ["baseline", "hkr", "ema", "onecycle", "narrow", "lipconvnet-aol", "narrower", "narrow-ema"]
    )


def test_the_riskiest_variants_reach_the_trainer(tmp_path):
    # JSON-valued settings (a loss option, a whole model_args) pass through bash word splitting and YAML intact.
    done = _run(tmp_path, "hkr", "lipconvnet-aol")
    assert done.returncode == 0, done.stderr[-3000:]
    hkr = json.loads((tmp_path / "hkr" / "mnist-lipschitz-10min-fast.json").read_text())
    base = {"model_args.inner_width": 1024, "ema_decay": 0.0}  # the recipe before the exploration, pinned
    assert hkr["changed"] == {"time_budget": None, **base, "loss": "hkr", "loss_options": {"alpha": 0.98}}
    conv = json.loads((tmp_path / "lipconvnet-aol" / "mnist-lipschitz-10min-fast.json").read_text())
    assert conv["model"] == "lipconvnet" and conv["model_args"] == {"family": "aol", "width": 16, "hidden": 256}
    for row in (hkr, conv):
        assert 0.0 <= row["methods"]["lipschitz"]["clean"] <= 1.0 and row["epochs"] == 2


def test_an_unknown_variant_is_refused(tmp_path):
    done = _run(tmp_path, "baseline", "bogus")
    assert done.returncode == 2
    assert "unknown variant 'bogus'; variants: baseline hkr" in done.stderr
    assert not list(tmp_path.glob("*/*.json"))  # refused before anything ran
