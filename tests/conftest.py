"""Shared fixtures: a small trained model on digits, the shared data directory, a private cache dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never write the data cache into the home directory during tests."""
    monkeypatch.setenv("STABLENET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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
