"""``bench layers``: rows with the required fields on tiny shapes, from the library and from the command line."""

import json
import sys

import pytest
import torch

from stablenet.bench import layers
from stablenet.bench.layers import (
    LAYER_FAMILIES,
    MODES,
    LayersBenchConfig,
    PlainResidualConv2d,
    bench_layers,
    default_config,
    format_row,
    plain_sll_network,
)
from stablenet.cli import main
from stablenet.models import create_model

FIELDS = {"layer", "shape", "mode", "time_ms", "ratio_to_plain", "peak_mem_mb", "device"}


def tiny_config(quick: bool = False) -> LayersBenchConfig:
    return LayersBenchConfig(
        batch_size=2,
        image_size=8,
        widths=(4,),
        model="sll_xs",
        model_options={"width": 4, "n_conv": 1, "n_dense": 1, "dense_inner": 8},
        warmup=1,
        repeats=1,
    )


def test_rows_have_the_fields():
    rows = bench_layers(device="cpu", config=tiny_config())
    assert [(r["layer"], r["mode"]) for r in rows] == [
        *[(family, mode) for family in LAYER_FAMILIES for mode in ("train", "eval", "eval_grad")],
        ("sll_xs", "train"),
        ("sll_xs", "eval"),
        ("sll_xs", "eval_grad"),
    ]
    for row in rows:
        if row["mode"] == "eval_grad":
            assert row["frozen_time_ms"] > 0
            assert row["ratio_to_frozen"] == pytest.approx(row["time_ms"] / row["frozen_time_ms"])
            assert "frozen" in format_row(row)
        assert FIELDS <= set(row)
        assert row["time_ms"] > 0 and row["plain_time_ms"] > 0
        assert row["ratio_to_plain"] == pytest.approx(row["time_ms"] / row["plain_time_ms"])
        assert row["device"] == "cpu" and row["peak_mem_mb"] is None
        json.dumps(row)
    assert rows[0]["shape"] == [2, 4, 8, 8]
    assert rows[-1]["shape"] == [2, 3, 8, 8] and rows[-1]["model_options"]["width"] == 4
    orthogonal = [r for r in rows if r["layer"] == "orthogonal"]
    assert orthogonal[0]["shape"] == [2, 64]


def test_default_configs_match_the_issue():
    full, quick = default_config(), default_config(quick=True)
    assert (full.batch_size, full.image_size, full.widths, full.model, full.bf16_batch_size) == (
        256,
        32,
        (64, 128),
        "sll_s",
        512,
    )
    assert full.families == LAYER_FAMILIES and full.repeats > 1 and full.warmup >= 1
    assert quick.batch_size < full.batch_size and quick.repeats == 1


def test_plain_twins_have_the_same_shapes():
    x = torch.randn(2, 4, 8, 8)
    assert PlainResidualConv2d(4, 2)(x).shape == x.shape
    opts = {"width": 4, "n_conv": 2, "n_dense": 1, "conv_inner": 2, "dense_inner": 8}
    model = create_model("sll_xs", 10, 3, 8, **opts)
    plain = plain_sll_network(10, 3, 8, **opts)
    shapes = sorted(tuple(p.shape) for n, p in model.named_parameters() if not n.endswith("q_log"))
    assert shapes == sorted(tuple(p.shape) for p in plain.parameters())
    assert plain(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_errors():
    with pytest.raises(ValueError, match="family must be one of sll, cpl"):
        bench_layers(config=LayersBenchConfig(families=("nope",)))
    with pytest.raises(ValueError, match="compares SLL or CPL networks"):
        bench_layers(config=LayersBenchConfig(batch_size=2, image_size=8, families=(), model="aol_xs"))


def test_rows_take_the_layers_of_the_registered_families():
    from stablenet.nn import CayleyConv2d, OrthogonalLinear, SLLConv2d

    assert layers._layer_class("sll") is SLLConv2d and layers._layer_class("cayley") is CayleyConv2d
    assert layers._layer_class("orthogonal") is OrthogonalLinear


def test_cli_quick_writes_json_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layers, "default_config", tiny_config)
    out = tmp_path / "rows.jsonl"
    assert main(["bench", "layers", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(MODES) * (len(LAYER_FAMILIES) + 1) and all(FIELDS <= set(r) for r in rows)
    printed = capsys.readouterr().out
    assert "ratio" in printed and "sll_xs" in printed and "orthogonal" in printed


def test_cli_rejects_bad_repeats(capsys):
    assert main(["bench", "layers", "--quick", "--repeats", "0"]) != 0
    assert "repeats must be >= 1; got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "suite,size,message",
    [
        ("layers", "0", "batch_size must be >= 1; got 0"),
        ("spectral", "4", "batch_size applies to the layers and train suites only; got it with 'spectral'"),
    ],
)
def test_cli_rejects_bad_batch_size(capsys, suite, size, message):
    assert main(["bench", suite, "--quick", "--batch-size", size]) == 2
    assert message in capsys.readouterr().err


def test_batch_size_override_reaches_the_rows(monkeypatch):
    rows = bench_layers(device="cpu", config=tiny_config(), batch_size=3)
    assert rows and all(r["shape"][0] == 3 for r in rows if r["mode"] != "train_bf16")


def test_families_select_rows():
    rows = bench_layers(device="cpu", config=tiny_config(), families=["aol", "sll_xs"])
    assert {r["layer"] for r in rows} == {"aol", "sll_xs"}
    rows = bench_layers(device="cpu", config=tiny_config(), families=["sll"])
    assert {r["layer"] for r in rows} == {"sll"}
    with pytest.raises(ValueError, match=r"families must be among .*sll_xs; got sll, bogus"):
        bench_layers(device="cpu", config=tiny_config(), families=["sll", "bogus"])


def test_cli_families(capsys):
    assert main(["bench", "smoothing", "--quick", "--families", "sll"]) == 2
    assert "families applies to the layers suite only" in capsys.readouterr().err
    assert main(["bench", "layers", "--quick", "--families", "bogus"]) == 2
    assert "families must be among" in capsys.readouterr().err


def test_bound_method_reaches_the_layers_and_rows(monkeypatch):
    """Note [circular bound method]: ``bound_method`` builds the spectral and CPL layers with it and is recorded."""
    built = []
    pair = layers._layer_pair

    def spy(family, width, size, bound_method="auto", spectral_n_iter=None):
        layer, plain, shape = pair(family, width, size, bound_method, spectral_n_iter)
        module = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
        constraint = getattr(module, "constraint", module)
        built.append((family, getattr(constraint, "method", None), getattr(constraint, "n_iter", None)))
        return layer, plain, shape

    monkeypatch.setattr(layers, "_layer_pair", spy)
    families = ["spectral", "cpl", "aol"]
    rows = bench_layers(device="cpu", config=tiny_config(), families=families, bound_method="gram", spectral_n_iter=5)
    assert sorted(built) == [("aol", None, None), ("cpl", "gram", None), ("spectral", "gram", 5)]
    assert {r["layer"]: r.get("bound_method") for r in rows} == {"spectral": "gram", "cpl": "gram", "aol": None}
    assert {r["layer"]: r.get("n_iter") for r in rows} == {"spectral": 5, "cpl": None, "aol": None}
    with pytest.raises(ValueError, match="bound_method must be one of auto, cholesky, gram; got 'svd'"):
        bench_layers(device="cpu", config=tiny_config(), families=["cpl"], bound_method="svd")
    with pytest.raises(ValueError, match="spectral_n_iter must be a positive int; got 0"):
        bench_layers(device="cpu", config=tiny_config(), families=["spectral"], spectral_n_iter=0)


def test_cli_bound_method(capsys):
    assert main(["bench", "spectral", "--quick", "--bound-method", "gram"]) == 2
    assert "bound_method applies to the layers suite only" in capsys.readouterr().err
    assert main(["bench", "layers", "--quick", "--families", "cpl", "--bound-method", "bogus"]) == 2
    assert "bound_method must be one of" in capsys.readouterr().err
    assert main(["bench", "curvature", "--quick", "--spectral-n-iter", "6"]) == 2
    assert "spectral_n_iter applies to the layers suite only" in capsys.readouterr().err


def test_reference_rows_measure_the_orthogonium_layers_beside_ours():
    pytest.importorskip("orthogonium")
    rows = bench_layers(device="cpu", config=tiny_config(), families=["aol", "orthogonium_aol", "orthogonium_sll"])
    assert [r["layer"] for r in rows if r["mode"] == "train"][:1] == ["aol"]
    by_layer = {r["layer"] for r in rows}
    assert by_layer == {"aol", "orthogonium_aol", "orthogonium_sll"}
    for row in rows:
        assert row["time_ms"] > 0 and row["plain_time_ms"] > 0
        assert row["ratio_to_plain"] == pytest.approx(row["time_ms"] / row["plain_time_ms"])


def test_reference_rows_without_the_package_fail_before_measuring(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "orthogonium", None)  # an import of it now raises ImportError
    monkeypatch.setitem(sys.modules, "orthogonium.layers.conv.AOL.aol", None)
    with pytest.raises(ImportError, match=r"orthogonium_aol row measures the orthogonium package's layer"):
        bench_layers(device="cpu", config=tiny_config(), families=["sll", "orthogonium_aol"])
    assert main(["bench", "layers", "--quick", "--families", "orthogonium_aol"]) != 0
    err = capsys.readouterr().err
    assert "pip install orthogonium" in err and "Traceback" not in err
