"""Shared fixtures: a small trained model on digits, the shared data directory, a private cache dir, one thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never write the data cache into the home directory during tests."""
    monkeypatch.setenv("STABLENET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny problems (``tests/nn`` takes it for every module).

    Threads only contend on tiny tensors, and beside another busy process OpenMP spin-waits make them up to
    10x slower. Not suite-wide: larger tests gain from both cores (the six-iteration zero-padding bound of
    ``tests/spectral/test_conv.py``: 28 s with two threads, 50 s with one, on an idle 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory):
    """A short training run of sll_mlp on digits (about 5 s on 2 cores), shared by the tests."""
    from stablenet.train import TrainConfig, train

    out = tmp_path_factory.mktemp("digits_run")
    config = TrainConfig(
        dataset="digits",
        model="sll_mlp",
        model_args={"width": 64, "depth": 3, "inner_width": 128},
        epochs=8,
        batch_size=64,
        lr=0.003,
        loss_offset=1.0,
        device="cpu",
        out=str(out / "run"),
    )
    torch.manual_seed(0)
    return train(config, progress=False)
