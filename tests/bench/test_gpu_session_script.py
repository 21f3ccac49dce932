"""benchmarks/gpu_session.sh (issue 21's one GPU run): its plumbing on a CPU with tiny sizes, and its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_session_script_runs_on_a_cpu_and_prints_one_table(tmp_path):
    # The two sections QUICK skips (ResNet-18 bound, bench spectral) leave their files to the table: give it some.
    (tmp_path / "resnet18.json").write_text(
        json.dumps({"median_ms": {"embed": 42.5}, "runs": {"embed": [{"total_ms": 42.5, "peak_mb": 1500.0}]}})
    )
    row = {"method": "circular_gram_certified", "layer": "layer4.1.conv2", "shape": [512, 512, 3, 3], "time_ms": 4.5}
    (tmp_path / "bench_spectral.jsonl").write_text(json.dumps(row) + "\n")
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PY": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("== table") :]
    assert "ResNet-18 bound, embed" in table and "42.5 ms" in table and "'peak_mb': 1500.0" in table
    assert "circular Gram bound circular_gram_certified layer4.1.conv2" in table and "4.50 ms" in table
    for mode in ("train", "eval", "eval_grad"):
        assert f"spectral width 16 {mode}" in table
    assert "frozen)" in table.split("spectral width 16 eval_grad")[1].splitlines()[0]
    assert table.count("attack step, demo model, batch") == 2
    # the reference rows run when vendor/ holds an orthogonium wheel, and say so when it does not
    wheel = list((ROOT / "vendor").glob("orthogonium-*.whl"))
    assert ("reference run: orthogonium_aol" in table) if wheel else ("reference rows skipped" in done.stdout)
    rows = [json.loads(line) for line in (tmp_path / "attack_step.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [1, 8] and all(r["frozen_ms"] > 0 for r in rows)
    assert all(r["provenance"]["device"] for r in rows)
