"""Fixtures for the data tests: an isolated environment and the shared real data."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Point every place stablenet.data reads or writes at ``tmp_path``.

    The cache goes to ``tmp_path/cache``, ``~`` is ``tmp_path/home``, ``./data`` is ``tmp_path/cwd/data``,
    ``$STABLENET_DATA`` is unset and torchvision cannot be imported (no download is ever tried).
    """
    env = SimpleNamespace(cache=tmp_path / "cache", home=tmp_path / "home", cwd=tmp_path / "cwd")
    env.home.mkdir()
    env.cwd.mkdir()
    monkeypatch.setenv("STABLENET_CACHE", str(env.cache))
    monkeypatch.delenv("STABLENET_DATA", raising=False)
    monkeypatch.setenv("HOME", str(env.home))
    monkeypatch.chdir(env.cwd)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    return env


@pytest.fixture
def shared_data() -> Path:
    """The read-only real data next to the repository (see ../shared/data/README.md)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is absent")
    return SHARED_DATA
