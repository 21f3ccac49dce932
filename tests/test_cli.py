"""The CLI end to end on a tiny run, and its one-line errors with exit status 2."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stablenet.certify.records import RECORD_FIELDS
from stablenet.cli import COMMANDS, main
from stablenet.cli.command import add_command
from stablenet.train.config import parse_override_args

TINY = [
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--model_args.width",
    "64",
    "--model_args.depth",
    "1",
    "--device",
    "cpu",
]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "stablenet.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_train_certify_report_end_to_end(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: sll_mlp\nlr: 0.003\n")
    assert main(["train", "-c", str(cfg), *TINY, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "config.yaml").read_text().count("epochs: 2") == 1
    out = tmp_path / "records.jsonl"
    assert (
        main(
            [
                "certify",
                "--run",
                str(tmp_path / "run"),
                "--method",
                "lipschitz",
                "--out",
                str(out),
                "--max-examples",
                "50",
                "--quiet",
            ]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert len(lines) == 50
    first = json.loads(lines[0])
    assert list(first) == list(RECORD_FIELDS) and first["method"] == "lipschitz" and first["norm"] == "l2"
    # resumable: a rerun over more examples certifies only the new ones
    assert main(["certify", "--run", str(tmp_path / "run"), "--out", str(out), "--max-examples", "80", "--quiet"]) == 0
    indices = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    assert indices == list(range(80))
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "digits" in report and "ε=0.5" in report
    assert (tmp_path / "report" / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --resume of a finished run is a no-op that succeeds
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--quiet"]) == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--epochz", "3"], "unknown config key(s) epochz; accepted:"),
        (["train", "--epochs", "three"], "config key 'epochs' must be int; got 'three'"),
        (["train", "--model", "resnet9000"], "unknown model 'resnet9000'; available: aol_l"),
        (["train", "--dataset", "imagenet"], "imagenet"),
        (["train", "--model_args.colour", "red"], "unknown option(s) colour for model 'sll_mlp'"),
        (["report", "missing.jsonl", "--out", "x"], "missing.jsonl"),
        (["certify", "--run", "nowhere", "--out", "x.jsonl"], "no checkpoint at nowhere"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    args = [a if a != "x" else str(tmp_path / "x") for a in args]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "stablenet.cli", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_negative_radius_and_truncated_checkpoint_keep_files_intact(tmp_path, trained_digits_run):
    run = Path(trained_digits_run.run_dir)
    out = tmp_path / "r.jsonl"
    assert main(["certify", "--run", str(run), "--out", str(out), "--max-examples", "5", "--quiet"]) == 0
    before = out.read_bytes()
    proc = run_cli("report", out, "--out", tmp_path / "rep", "--radii", "0.5,-1")
    assert proc.returncode == 2 and "radius must be >= 0" in proc.stderr and len(proc.stderr.splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:-100])
    proc = run_cli("certify", "--run", broken, "--out", out, "--quiet")
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert out.read_bytes() == before


def test_wrong_image_shape_is_a_clear_error(trained_digits_run):
    import torch

    with pytest.raises(
        ValueError, match=r"expected inputs of shape \(N, 1, 8, 8\) with pixels in \[0, 1\]; got \(2, 3, 8, 8\)"
    ):
        trained_digits_run.model(torch.rand(2, 3, 8, 8))
    with pytest.raises(
        ValueError, match=r"expected inputs of shape \(N, 1, 8, 8\) with pixels in \[0, 1\]; got \(2, 1, 28, 28\)"
    ):
        trained_digits_run.model(torch.rand(2, 1, 28, 28))


def test_certify_with_grid_noise_records_it(tmp_path, trained_digits_run, capsys):
    out = tmp_path / "grid.jsonl"
    args = ["certify", "--run", str(trained_digits_run.run_dir), "--out", str(out), "--method", "smoothing"]
    args += ["--sigma", "0.25", "--n0", "10", "--n", "100", "--max-examples", "3", "--quiet"]
    assert main([*args, "--noise", "grid"]) == 0
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert (meta["noise"], meta["levels"]) == ("grid", 16)  # the digits grid k / 16 by default
    assert main([*args, "--max-examples", "4"]) == 2  # float noise into a grid file
    err = capsys.readouterr().err
    assert "refusing to add records for noise 'float'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--noise", "gauss"], "noise must be one of float, grid; got 'gauss'"),
        (["--noise", "grid", "--levels", "0"], "levels must be an int >= 1; got 0"),
        (["--noise", "grid", "--levels", "many"], "--levels must be an int >= 1; got 'many'"),
        (["--levels", "255"], "levels goes with noise 'grid' only"),
        (["--noise", "grid", "--levels", "255"], "needs inputs on the grid k / 255"),
        (["--noise", "grid", "--sigma", "300"], "sigma * levels must be at most 4096"),
        (["--method", "lipschitz", "--noise", "grid"], "--noise and --levels apply to the randomized methods"),
    ],
)
def test_bad_noise_options_one_line_exit_2(tmp_path, trained_digits_run, capsys, extra, message):
    out = tmp_path / "bad.jsonl"
    args = ["certify", "--run", str(trained_digits_run.run_dir), "--out", str(out), "--method", "lvm-rs"]
    args += ["--sigma", "0.25", "--n0", "10", "--n", "100", "--max-examples", "2", "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("stablenet: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("spelling", ["--data-root", "--data_root"])
def test_train_takes_config_keys_with_dashes_or_underscores(tmp_path, spelling):
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "1", spelling, str(tmp_path / "data"), "--batch-size", "32"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data_root"] == str(tmp_path / "data") and saved["batch_size"] == 32 and saved["epochs"] == 1


def test_config_override_keys_read_dashes_as_underscores():
    overrides = parse_override_args(["--data-root", "d", "--loss_offset=0.5", "--model-args.inner-width", "32"])
    assert overrides == {"data_root": "d", "loss_offset": 0.5, "model_args.inner_width": 32}


def test_every_flag_is_spelled_with_dashes():
    """One spelling of every flag: ``--data-root`` everywhere (config field ``data_root``)."""
    for name, command in COMMANDS.items():
        flags = re.findall(r"--[\w-]+", add_command(argparse.ArgumentParser().add_subparsers(), command).format_usage())
        assert flags and all("_" not in flag for flag in flags), (name, flags)
        if name in ("certify", "verify", "hessian", "landscape", "lipschitz"):
            assert "--data-root" in flags


def test_a_command_runs_from_its_config_as_from_its_flags(tmp_path, capsys):
    """The config dataclass is the command: its fields are the flags, with the same defaults."""
    from stablenet.cli.certify import LipschitzArgs, lipschitz_command

    path = tmp_path / "a.json"
    assert lipschitz_command(LipschitzArgs(model="sll_mlp", input_size=6, num_inputs=4, json=str(path))) == 0
    from_config = capsys.readouterr().out
    args = ["lipschitz", "--model", "sll_mlp", "--input-size", "6", "--num-inputs", "4", "--json", str(path)]
    assert main(args) == 0
    assert capsys.readouterr().out == from_config
