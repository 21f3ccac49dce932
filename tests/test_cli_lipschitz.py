"""``stablenet lipschitz``: both bounds, the per-layer table, the JSON file, one-line errors."""

import json
import math
import re

import pytest

from stablenet.cli import main
from stablenet.spectral import lipschitz_upper_bound


def test_registry_model_prints_both_bounds_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bounds.json"
    args = ["lipschitz", "--model", "sll_mlp", "--in-channels", "1", "--input-size", "8", "--json", str(out)]
    assert main([*args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "upper bound (certified):" in printed
    assert "lower bound (empirical, 64 uniform random inputs in [0, 1]):" in printed
    record = json.loads(out.read_text())
    assert set(record) == {"upper", "lower", "layers", "input_shape"}
    assert record["input_shape"] == [1, 8, 8]
    assert [layer["name"] for layer in record["layers"]] == [str(i) for i in range(8)]
    assert 0 < record["lower"] <= record["upper"]
    assert record["upper"] >= math.prod(layer["bound"] for layer in record["layers"])
    for layer in record["layers"]:
        assert re.search(rf"^{layer['name']} +{layer['bound']:.6g}$", printed, re.MULTILINE)
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, no temporary file left


def test_registry_model_is_reproducible(tmp_path):
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        args = ["lipschitz", "--model", "sll_mlp", "--input-size", "6", "--num-inputs", "8", "--json", str(out)]
        assert main(args) == 0
    assert outs[0].read_text() == outs[1].read_text()


def test_trained_run_uses_its_test_images(trained_digits_run, tmp_path, capsys):
    out = tmp_path / "bounds.json"
    assert main(["lipschitz", "--run", str(trained_digits_run.run_dir), "--json", str(out), "--quiet"]) == 0
    assert "lower bound (empirical, 64 digits test images)" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["input_shape"] == [1, 8, 8]
    assert record["upper"] == lipschitz_upper_bound(trained_digits_run.model, input_shape=(1, 8, 8))
    assert 0 < record["lower"] <= record["upper"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet9000"], "unknown model 'resnet9000'; available: aol_l"),
        (["--run", "nowhere"], "no checkpoint at nowhere"),
        (["--model", "sll_mlp", "--input-size", "4", "--num-inputs", "0"], "num_inputs must be >= 1; got 0"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(args, message, capsys):
    assert main(["lipschitz", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("stablenet: error:")
    assert len(err.strip().splitlines()) == 1, err


def test_run_and_model_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lipschitz", "--run", "x", "--model", "sll_mlp"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
