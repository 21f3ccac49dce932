"""The suite table: ``run_suite`` checks each suite's own options from it, ``format_table`` is what the CLI prints."""

import dataclasses

import pytest

from stablenet.bench import SUITES, format_table, run_suite
from stablenet.cli import main

ROWS = {
    "spectral": [{"layer": "conv1", "method": "circular_exact", "ratio": 1.0, "time_ms": 2.5}],
    "smoothing": [
        {
            "model": "mnist_mlp",
            "n": 100,
            "batch_size": 1000,
            "samples_per_s": 1.5e6,
            "plain_samples_per_s": 1.6e6,
            "ratio": 0.94,
            "noise_bound": 0.97,
        }
    ],
    "curvature": [
        {
            "benchmark": "top_eigenvalue",
            "method": "lanczos",
            "start": "gradient",
            "model": "lenet",
            "value": 3.2,
            "time_ms": 40.0,
            "ratio_or_gradient_equivalents": 21.0,
        },
        {
            "benchmark": "hvp_over_grad",
            "backend": "double_backward",
            "model": "lenet",
            "value": 2.1,
            "time_ms": 1.0,
            "ratio_or_gradient_equivalents": 2.1,
        },
    ],
    "layers": [
        {
            "layer": "sll",
            "shape": [256, 64, 32, 32],
            "mode": "train",
            "time_ms": 12.0,
            "ratio_to_plain": 3.0,
            "peak_mem_mb": None,
        }
    ],
    "train": [
        {
            "model": "sll_mlp",
            "variant": "constrained",
            "loader": None,
            "precision": "bf16",
            "compile": True,
            "images_per_s": 950.0,
            "ratio": 0.8,
            "peak_mem_mb": None,
        },
        {
            "model": "sll_mlp",
            "variant": "data",
            "loader": "device",
            "precision": None,
            "compile": None,
            "images_per_s": 1.2e6,
            "ratio": 1260.0,
            "peak_mem_mb": None,
        },
    ],
}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_cli_prints_format_table(suite, monkeypatch, capsys):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return ROWS[suite]

    monkeypatch.setitem(SUITES, suite, dataclasses.replace(SUITES[suite], run=fake))
    assert main(["bench", suite, "--quick", "--quiet"]) == 0
    assert capsys.readouterr().out == format_table(suite, ROWS[suite]) + "\n"
    assert calls == [{"quick": True, "device": calls[0]["device"], "repeats": None, "progress": None}]
    table = format_table(suite, ROWS[suite]).splitlines()
    assert table[0] == SUITES[suite].header and len(table) == 1 + len(ROWS[suite])


def test_curvature_rows_are_labelled_by_method_and_start_or_backend():
    lines = format_table("curvature", ROWS["curvature"]).splitlines()
    assert "lanczos/gradient" in lines[1] and "double_backward" in lines[2]


@pytest.mark.parametrize(
    ("name", "value", "owner"),
    [
        ("batch_size", 4, "layers and train suites"),
        ("model", ("sll_mlp",), "train"),
        ("data_streaming", True, "train"),
        ("families", ("sll",), "layers"),
        ("bound_method", "gram", "layers"),
        ("spectral_n_iter", 6, "layers"),
        ("methods", ("circular_exact",), "spectral"),
        ("data", "mnist", "curvature"),
    ],
)
def test_an_option_of_another_suite_is_named_with_its_owner(name, value, owner):
    owners = owner if owner.endswith(" suites") else f"{owner} suite"
    for suite in SUITES:
        if suite not in owner.split():
            with pytest.raises(ValueError, match=f"^{name} applies to the {owners} only; got it with '{suite}'$"):
                run_suite(suite, quick=True, **{name: value})


def test_bad_suite_repeats_and_unknown_option():
    with pytest.raises(
        ValueError, match="suite must be one of spectral, smoothing, curvature, layers, train; got 'gpu'"
    ):
        run_suite("gpu")
    with pytest.raises(ValueError, match="repeats must be >= 1; got 0"):
        run_suite("spectral", repeats=0)
    with pytest.raises(ValueError, match="unknown benchmark option 'width'; accepted: batch_size, bound_method"):
        run_suite("spectral", width=3)
