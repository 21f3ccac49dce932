"""Data-parallel training under torchrun on CPUs (gloo, 2 processes): the same weights as one process with the same
global batch, rank 0 writes the files, a killed run resumes, and bad world sizes are refused.

Tolerance: after 2 epochs of Adam (46 steps of a 64-wide SLL network on digits, crops, flips and noise), the
weights of the 2-process run must be within 1e-5 (absolute, per weight) of the single-process run's; measured:
8.9e-8. The only difference is the order of floating-point sums (each rank's gradient, then their average).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stablenet.models import load_model
from stablenet.train import TrainConfig, parse_override_args, train
from stablenet.train.checkpoint import load_training_state

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")

TOLERANCE = 1e-5

CONFIG = {
    "dataset": "digits",
    "model": "sll_mlp",
    "model_args": {"width": 64, "depth": 2, "inner_width": 64},
    "epochs": 2,
    "batch_size": 64,
    "lr": 0.003,
    "crop_padding": 1,
    "flip": True,
    "noise_sigma": 0.1,
    "device": "cpu",
    "seed": 3,
}


def _torchrun_args(out: Path, *extra: str, nproc: int = 2) -> list[str]:
    args = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "stablenet.cli", "--", "train"]
    for key, value in CONFIG.items():
        if key == "model_args":
            args += [f"--model_args.{k}={v}" for k, v in value.items()]
        else:
            args += [f"--{key}", str(value)]
    return [*args, "--out", str(out), "--quiet", *extra]


def _torchrun(out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        _torchrun_args(out, *extra, nproc=nproc), capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "single"
    return train(TrainConfig.from_dict({**CONFIG, "out": str(out)}), progress=False)


def test_two_ranks_train_the_weights_of_one_process(tmp_path, single_run):
    out = tmp_path / "ddp"
    proc = _torchrun(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_model(out)
    for (name, a), (_, b) in zip(single_run.model.state_dict().items(), ddp.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=TOLERANCE), f"{name}: max diff {float((a - b).abs().max())}"
    state = load_training_state(out)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's generators, for exact resume
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3  # rank 0 alone wrote it: a header and two epochs
    # metrics reduced over the ranks: the same accuracies as one process
    single_acc = [round(r["test_acc"], 6) for r in single_run.metrics]
    rows = list(csv.DictReader(lines))
    assert [round(float(row["test_acc"]), 6) for row in rows] == single_acc


REGULARIZERS = "[{name: gradient_norm, weight: 0.01}, {name: activation_decay, weight: 0.01}]"


def test_regularizers_under_ddp_give_the_weights_of_one_process(tmp_path):
    # The penalties are batch means, weighted like the loss (Note [global batch]); measured max diff: 2e-7.
    extra = ("--epochs", "1", "--regularizers", REGULARIZERS)
    proc = _torchrun(tmp_path / "ddp", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = parse_override_args(["--regularizers", REGULARIZERS])
    single = train(
        TrainConfig.from_dict({**CONFIG, **overrides, "epochs": 1, "out": str(tmp_path / "one")}), progress=False
    )
    ddp = load_model(tmp_path / "ddp").state_dict()
    for name, a in single.model.state_dict().items():
        b = ddp[name]
        assert torch.allclose(a, b, rtol=0, atol=TOLERANCE), f"{name}: max diff {float((a - b).abs().max())}"


RANK_SCRIPT = """
import sys
from safetensors.torch import save_file
from stablenet.train import TrainConfig, train
from stablenet.train.config import load_config

config = load_config(sys.argv[1], {})
result = train(config, progress=False)
rank = __import__("torch").distributed.get_rank()
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, f"{config.out}/rank{rank}.safetensors")
"""


def test_sam_under_ddp_keeps_every_rank_on_the_same_weights(tmp_path):
    # Under DDP each rank ascends along its own batch's gradient (m-sharpness, Note [SAM and DDP] in
    # stablenet.curvature.sam); the base step uses the all-reduced gradient, so the ranks must stay identical.
    # tests/curvature/test_sam.py checks the step itself against a hand computation with two processes.
    config = {**CONFIG, "epochs": 1, "sam_rho": 0.05, "out": str(tmp_path / "sam")}
    config["regularizers"] = parse_override_args(["--regularizers", REGULARIZERS])["regularizers"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(tmp_path / "rank.py"), str(tmp_path / "config.yaml")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(tmp_path / "sam" / f"rank{r}.safetensors") for r in range(2)]
    saved = load_model(tmp_path / "sam").state_dict()
    plain = train(TrainConfig.from_dict({**CONFIG, "epochs": 1, "out": str(tmp_path / "plain")}), progress=False)
    for name, weight in ranks[0].items():
        assert torch.equal(weight, ranks[1][name]), f"{name}: the ranks diverged"
        assert torch.equal(weight, saved[name]), f"{name}: rank 0 saved other weights"
    assert any(not torch.allclose(ranks[0][k], v, atol=1e-4) for k, v in plain.model.state_dict().items())


def test_a_killed_ddp_run_resumes_to_the_same_weights(tmp_path):
    full = tmp_path / "full"
    assert _torchrun(full, "--epochs", "4").returncode == 0
    killed = tmp_path / "killed"
    args = _torchrun_args(killed, "--epochs", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = killed / "metrics.csv"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # epoch 1's checkpoint is written
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    epochs_done = len(metrics.read_text().splitlines()) - 1
    assert 1 <= epochs_done < 4, "the run should have been killed between epochs 1 and 4"
    resumed = _torchrun(killed, "--epochs", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_model(full).state_dict(), load_model(killed).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming"


def test_resuming_with_another_world_size_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    assert _torchrun(out, "--epochs", "1").returncode == 0
    config = TrainConfig.from_dict({**CONFIG, "epochs": 1, "out": str(out)})
    with pytest.raises(ValueError, match=r"trained with 2 process\(es\), this run has 1; resume with the same"):
        train(config, resume=True, progress=False)


def test_a_global_batch_the_world_size_does_not_divide_is_refused_before_training(tmp_path):
    proc = _torchrun(tmp_path / "odd", "--batch_size", "63")
    assert proc.returncode != 0
    assert "batch_size is the global batch and must be divisible by the world size 2; got 63" in proc.stderr
    assert not (tmp_path / "odd" / "train_state.pt").exists()
