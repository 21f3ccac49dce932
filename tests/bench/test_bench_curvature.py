"""``bench curvature``: rows with the documented fields, from the library and from the command line."""

import json

import pytest
import torch

pytest.importorskip("stablenet.curvature.hessian")

from stablenet.bench import curvature
from stablenet.bench.curvature import CurvatureSizes, bench_curvature, default_sizes
from stablenet.cli import main

# torch's forward-mode AD (the forward_over_reverse backend) scripts its decompositions on first use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

FIELDS = {"benchmark", "model", "value", "time_ms", "ratio_or_gradient_equivalents", "device"}
# Tiny lenet on 8x8 images; a tight tolerance so that Lanczos and power iteration both converge.
TINY = CurvatureSizes(
    batch_size=16, landscape_examples=20, landscape_resolution=3, width=2, hidden=8, input_size=8, tol=1e-6
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids the stalls of two OpenMP threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_sizes(quick=False):
    return TINY


def test_rows_have_the_fields_and_consistent_values():
    rows = bench_curvature(device="cpu", repeats=2, sizes=TINY)
    assert [(r["benchmark"], r.get("method") or r.get("backend")) for r in rows] == [
        ("hvp_over_grad", "double_backward"),
        ("hvp_over_grad", "forward_over_reverse"),
        ("top_eigenvalue", "lanczos"),
        ("top_eigenvalue", "power"),
        ("top_eigenvalue", "lanczos"),
        ("landscape_2d", None),
    ]
    assert [r["start"] for r in rows if r["benchmark"] == "top_eigenvalue"] == ["gradient", "gradient", "random"]
    for row in rows:
        assert FIELDS <= set(row)
        expected = "lipconvnet" if row["benchmark"] == "landscape_2d" else "lenet"
        assert row["model"] == expected and row["device"] == "cpu" and row["data"] == "random"
        assert row["time_ms"] > 0 and row["ratio_or_gradient_equivalents"] > 0
    hvp, alternative, lanczos, power, lanczos_random, land = rows
    for row in (hvp, alternative):
        assert (
            row["value"] == row["ratio_or_gradient_equivalents"] == pytest.approx(row["time_ms"] / row["grad_time_ms"])
        )
        assert row["meets_target"] == (row["value"] <= 2.5)
    for row in (lanczos, power, lanczos_random):
        # Note [interleaved gradient timing]: against gradients timed beside each solve, not hvp's grad_time_ms.
        assert row["repeats"] == 2 and row["ratio_or_gradient_equivalents"] > 0
        assert row["num_hvp"] >= 2 and row["converged"]
        assert row["hvp_equivalents"] == pytest.approx(row["num_hvp"] * hvp["value"])
        assert row["relative_error"] == pytest.approx(abs(row["value"] - row["reference"]) / row["reference"])
        assert row["relative_error"] < 1e-3
    assert power["relative_difference"] == pytest.approx(abs(power["value"] - lanczos["value"]) / lanczos["value"])
    assert power["agrees"] and power["relative_difference"] <= 1e-3
    assert land["points"] == 9 and land["num_examples"] == 20 and land["num_parameters"] > 0
    assert land["value"] > 0  # cross-entropy at the origin


def test_default_sizes_match_the_issue():
    full, quick = default_sizes(), default_sizes(quick=True)
    assert (full.batch_size, full.landscape_examples, full.landscape_resolution, full.tol) == (256, 1000, 21, 1e-3)
    assert (full.input_size, full.width) == (28, 32)
    assert quick.batch_size < full.batch_size and quick.landscape_resolution < full.landscape_resolution


def test_bad_repeats():
    with pytest.raises(ValueError, match="repeats must be >= 1; got -1"):
        bench_curvature(repeats=-1, sizes=TINY)


def test_cli_quick_writes_json_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(curvature, "default_sizes", _tiny_sizes)
    out = tmp_path / "rows.jsonl"
    assert main(["bench", "curvature", "--quick", "--device", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(FIELDS <= set(r) for r in rows)
    printed = capsys.readouterr().out
    assert "hvp_over_grad" in printed and "landscape_2d" in printed and str(out) in printed


def test_bad_data_source():
    with pytest.raises(ValueError, match="data must be one of random, mnist; got 'imagenet'"):
        bench_curvature(sizes=TINY, data="imagenet")
    with pytest.raises(ValueError, match=r"data='mnist' needs sizes\.input_size == 28; got 8"):
        bench_curvature(sizes=TINY, data="mnist")


def test_cli_rejects_data_for_other_suites(capsys):
    assert main(["bench", "spectral", "--quick", "--data", "mnist"]) == 2
    assert "data applies to the curvature suite only" in capsys.readouterr().err


def test_mnist_rows_measure_a_trained_network(shared_data, monkeypatch):
    """With real data, lenet is trained first (its accuracy on the measured batch shows it) and measured."""
    monkeypatch.setenv("STABLENET_DATA", str(shared_data))
    trained = []
    original = curvature._train_briefly

    def spy(model, seed, device):
        original(model, seed, device)
        images, labels = curvature._mnist(256, device)
        with torch.no_grad():
            trained.append(float((model(images).argmax(1) == labels).float().mean()))

    monkeypatch.setattr(curvature, "_train_briefly", spy)
    sizes = CurvatureSizes(
        batch_size=32, landscape_examples=20, landscape_resolution=3, width=4, hidden=16, input_size=28, tol=1e-6
    )
    rows = bench_curvature(device="cpu", repeats=1, sizes=sizes, data="mnist")
    assert trained and trained[0] > 0.3  # one pass over 10 000 images: far above chance (0.1), even this tiny
    assert all(r["data"] == "mnist" for r in rows)
    lanczos = next(r for r in rows if r.get("method") == "lanczos")
    assert lanczos["converged"] and lanczos["relative_error"] < 1e-3


def test_solve_cost_is_the_median_ratio_to_neighbouring_gradients(monkeypatch):
    """Note [interleaved gradient timing]: each solve over the median of the three gradients timed before it."""
    clock = iter([1.0, 3.0, 2.0, 10.0, 4.0, 4.0, 4.0, 12.0, 1.0, 1.0, 9.0, 8.0])  # grads, solve; x3

    def fake_wall(fn, device):
        return fn(), next(clock)

    monkeypatch.setattr(curvature, "_wall", fake_wall)
    result, seconds, equivalents = curvature._solve_cost(lambda: "solved", lambda: None, 3, torch.device("cpu"))
    # ratios: 10/2 = 5, 12/4 = 3, 8/1 = 8 -> median 5; solve times 10, 12, 8 -> median 10
    assert result == "solved" and seconds == 10.0 and equivalents == 5.0
