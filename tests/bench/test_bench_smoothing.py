"""``bench smoothing``: rows with the documented fields, from the library and from the command line."""

import json

import pytest
import torch

from stablenet.bench import smoothing
from stablenet.bench.smoothing import SmoothingCase, bench_smoothing, cifar_cnn, default_cases, mnist_mlp
from stablenet.cli import main

FIELDS = {"model", "n", "batch_size", "samples_per_s", "plain_samples_per_s", "ratio", "device"}


def _tiny_cases(quick=False, batch_size=100, gpu=False):
    return [
        SmoothingCase("cifar_cnn", lambda: cifar_cnn(width=4), (3, 32, 32), n=200, n_images=1, batch_size=100),
        SmoothingCase("mnist_mlp", lambda: mnist_mlp(width=16), (1, 28, 28), n=10, n_images=30, batch_size=100),
    ]


def test_rows_have_the_fields():
    rows = bench_smoothing(device="cpu", repeats=1, cases=_tiny_cases())
    assert [r["model"] for r in rows] == ["cifar_cnn", "mnist_mlp"]
    for row in rows:
        assert FIELDS <= set(row)
        assert row["samples_per_s"] > 0 and row["plain_samples_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["samples_per_s"] / row["plain_samples_per_s"])
        assert row["device"] == "cpu"
    assert rows[1]["images_per_batch"] == 10  # several images share a batch


def test_noise_bound_draws_what_the_loop_draws(monkeypatch):
    """The noise-only timing draws as many noise images as the certification loop does."""
    from stablenet.smoothing.sampling import class_counts, make_generator

    case = _tiny_cases()[1]
    row = bench_smoothing(device="cpu", repeats=1, cases=[case])[0]
    assert row["noise_bound"] == pytest.approx(row["plain_time_ms"] / (row["plain_time_ms"] + row["noise_time_ms"]))
    assert 0 < row["noise_bound"] <= 1
    drawn = []
    original = torch.randn

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        drawn.append(out.shape[0] * out.shape[2])  # (k passes, 1, reps draws, ...)
        return out

    monkeypatch.setattr(torch, "randn", spy)
    x = torch.rand(case.n_images, *case.input_shape)
    class_counts(case.make_model().eval(), x, case.n, 0.5, 10, case.batch_size, make_generator(0, torch.device("cpu")))
    assert sum(drawn) == row["noise_images"]


def test_default_cases_match_the_issue():
    full, quick = default_cases(), default_cases(quick=True)
    assert [(c.name, c.input_shape, c.n, c.batch_size) for c in full] == [
        ("cifar_cnn", (3, 32, 32), 100_000, 1000),
        ("mnist_mlp", (1, 28, 28), 100, 1000),
    ]
    assert quick[0].n == 10_000
    assert all(c.batch_size // c.n >= 10 for c in full[1:])


def test_cli_quick_writes_json_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smoothing, "default_cases", _tiny_cases)
    out = tmp_path / "rows.jsonl"
    assert main(["bench", "smoothing", "--quick", "--device", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(FIELDS <= set(r) for r in rows)
    assert "mnist_mlp" in capsys.readouterr().out


def test_resnet110_case_only_on_gpu_and_not_quick():
    from stablenet.bench.smoothing import default_cases

    assert "resnet110" not in [c.name for c in default_cases(quick=False)]
    assert "resnet110" not in [c.name for c in default_cases(quick=True, gpu=True)]
    (case,) = [c for c in default_cases(quick=False, gpu=True) if c.name == "resnet110"]
    assert case.n == 100_000 and case.input_shape == (3, 32, 32)
