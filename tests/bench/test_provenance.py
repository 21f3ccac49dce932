"""Provenance records: every key in every row that ``stablenet bench --json`` writes, and nothing fails outside git."""

import json
import subprocess
import sys
from datetime import datetime, timedelta

import pytest

from stablenet.bench import provenance, write_rows
from stablenet.bench.provenance import PROVENANCE_KEYS
from stablenet.cli import main

provenance_module = sys.modules["stablenet.bench.provenance"]  # the attribute is the function of that name


def _main_module(spec_name: str | None):
    """A ``__main__`` module as Python sets it: with a ``__spec__`` under ``python -m``, without one otherwise."""
    module = type(sys)("__main__")
    module.__spec__ = None if spec_name is None else type("Spec", (), {"name": spec_name})()
    return module


def test_bench_json_rows_carry_every_provenance_key(tmp_path, monkeypatch):
    out = tmp_path / "rows.jsonl"
    argv = ["bench", "layers", "--quick", "--families", "sll", "--batch-size", "2", "--repeats", "1"]
    argv += ["--json", str(out), "--quiet"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/.venv/bin/stablenet", *argv])  # the console script
    monkeypatch.setitem(sys.modules, "__main__", _main_module(None))
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows
    for row in rows:
        record = row["provenance"]
        assert tuple(record) == PROVENANCE_KEYS
        assert record["command"] == "stablenet " + " ".join(argv)
        assert record["device"].endswith(" cores)")  # a CPU run: the CPU model and the cores this process may use
        assert record["torch"] and record["python"]
        assert isinstance(record["commit"], str) and len(record["commit"]) == 40 and isinstance(record["dirty"], bool)
    assert len({json.dumps(row["provenance"]) for row in rows}) == 1


def test_date_is_utc_iso_8601():
    date = datetime.fromisoformat(provenance("x")["date"])
    assert date.utcoffset() == timedelta(0)


def test_outside_a_git_checkout_commit_and_dirty_are_none(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance_module, "_package_dir", lambda: tmp_path)
    record = provenance("x")
    assert record["commit"] is None and record["dirty"] is None


def test_without_git_nothing_fails(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    record = provenance("x")
    assert record["commit"] is None and record["dirty"] is None and record["command"] == "x"


def test_a_cuda_run_names_the_gpu(monkeypatch):
    monkeypatch.setattr(provenance_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(provenance_module.torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    assert provenance("x", device="cuda:0")["device"] == "NVIDIA H200"
    assert provenance("x", device="cpu")["device"] != "NVIDIA H200"


@pytest.mark.parametrize(
    ("argv", "spec", "command"),
    [
        (["benchmarks/resnet18_bound.py", "--repeats", "3"], None, "python benchmarks/resnet18_bound.py --repeats 3"),
        (["/abs/.venv/bin/stablenet", "bench", "a b"], None, "stablenet bench 'a b'"),
        (["/abs/src/stablenet/cli/__main__.py", "bench"], "stablenet.cli.__main__", "python -m stablenet.cli bench"),
        (["-", "out.jsonl"], None, "python - out.jsonl"),
    ],
)
def test_default_command_is_the_command_line(argv, spec, command, monkeypatch):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setitem(sys.modules, "__main__", _main_module(spec))
    assert provenance()["command"] == command


def test_write_rows_keeps_a_rows_own_provenance(tmp_path):
    out = tmp_path / "rows.jsonl"
    write_rows([{"a": 1, "device": "cpu"}, {"a": 2, "provenance": {"commit": "old"}}], out, command="cmd")
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["provenance"]["command"] == "cmd" and second["provenance"] == {"commit": "old"}
