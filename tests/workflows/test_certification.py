"""Certification runs: smoothing methods through the runner, and sharding under torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stablenet.certify.records import read_metadata, read_records
from stablenet.workflows.certification import SmoothingParams, certify_run


def test_smoothing_params_validation():
    for kwargs, message in [
        (dict(sigma=0.0), "sigma must be > 0"),
        (dict(sigma=0.5, n=0), "n0 and n must be >= 1"),
        (dict(sigma=0.5, alpha=1.5), r"alpha must be in \(0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            SmoothingParams(**kwargs)


def test_smoothing_run_writes_records_and_metadata(tmp_path, trained_digits_run):
    out = tmp_path / "smooth.jsonl"
    params = SmoothingParams(sigma=0.25, n0=20, n=200, alpha=0.01, seed=1)
    certify_run(
        trained_digits_run.run_dir,
        out,
        method="smoothing",
        smoothing=params,
        max_examples=12,
        batch_size=100,
        progress=False,
    )
    records = read_records(out)
    assert [r.index for r in records] == list(range(12))
    assert all(r.method == "smoothing" and r.radius >= 0 for r in records)
    meta = read_metadata(out)
    assert meta["sigma"] == 0.25 and meta["n"] == 200 and meta["dataset"] == "digits"
    again = tmp_path / "again.jsonl"
    certify_run(
        trained_digits_run.run_dir,
        again,
        method="smoothing",
        smoothing=params,
        max_examples=12,
        batch_size=100,
        progress=False,
    )
    assert [(r.prediction, r.radius) for r in read_records(again)] == [(r.prediction, r.radius) for r in records]
    with pytest.raises(ValueError, match="needs smoothing parameters"):
        certify_run(trained_digits_run.run_dir, tmp_path / "x.jsonl", method="smoothing", progress=False)


def test_lipschitz_run_records_its_arithmetic_and_refuses_to_mix(tmp_path, trained_digits_run):
    out = tmp_path / "lip.jsonl"
    certify_run(trained_digits_run.run_dir, out, max_examples=20, progress=False)
    meta = read_metadata(out)
    assert meta["arithmetic"] == "float64" and meta["method"] == "lipschitz"
    native = tmp_path / "native.jsonl"
    certify_run(trained_digits_run.run_dir, native, arithmetic="native", max_examples=20, progress=False)
    pairs = zip(read_records(out), read_records(native), strict=True)
    assert all(n.radius <= f.radius for f, n in pairs)  # the native bound is the more pessimistic
    with pytest.raises(ValueError, match="refusing to add records for arithmetic 'native'"):
        certify_run(trained_digits_run.run_dir, out, arithmetic="native", max_examples=30, progress=False)
    # a file written before certificates named their arithmetic (native float32, unproven tolerance)
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(out.read_text())
    meta.pop("arithmetic")
    (tmp_path / "legacy.jsonl.meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="made before certificates named their arithmetic"):
        certify_run(trained_digits_run.run_dir, legacy, max_examples=30, progress=False)


def test_smoothing_params_noise_validation():
    for kwargs, message in [
        (dict(noise="gauss"), "noise must be one of float, grid; got 'gauss'"),
        (dict(levels=255), "levels goes with noise 'grid' only"),
        (dict(noise="grid", levels=0), "levels must be an int >= 1; got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            SmoothingParams(sigma=0.5, **kwargs)


def test_grid_run_records_its_noise_and_a_resumed_file_cannot_mix_noises(tmp_path, trained_digits_run):
    run, out = trained_digits_run.run_dir, tmp_path / "grid.jsonl"
    grid = SmoothingParams(sigma=0.25, n0=10, n=100, alpha=0.01, noise="grid")
    certify_run(run, out, method="lvm-rs", smoothing=grid, max_examples=3, batch_size=100, progress=False)
    meta = read_metadata(out)
    assert meta["noise"] == "grid" and meta["levels"] == 16  # digits are k / 16 (Note [grid runs])
    assert len(read_records(out)) == 3
    for other, key in [
        (SmoothingParams(sigma=0.25, n0=10, n=100, alpha=0.01), "noise 'float'"),
        (SmoothingParams(sigma=0.25, n0=10, n=100, alpha=0.01, noise="grid", levels=32), "levels 32"),
    ]:
        with pytest.raises(ValueError, match=f"refusing to add records for {key}"):
            certify_run(run, out, method="lvm-rs", smoothing=other, max_examples=5, batch_size=100, progress=False)
    assert len(read_records(out)) == 3
    # float noise is recorded too; a file from before noise was recorded drew float noise and stays float
    plain = SmoothingParams(sigma=0.25, n0=10, n=100, alpha=0.01)
    legacy = tmp_path / "legacy.jsonl"
    certify_run(run, legacy, method="smoothing", smoothing=plain, max_examples=2, batch_size=100, progress=False)
    meta = read_metadata(legacy)
    assert meta["noise"] == "float" and "levels" not in meta
    meta.pop("noise")
    (tmp_path / "legacy.jsonl.meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="made before certificates named their noise"):
        certify_run(run, legacy, method="smoothing", smoothing=grid, max_examples=4, batch_size=100, progress=False)
    certify_run(run, legacy, method="smoothing", smoothing=plain, max_examples=4, batch_size=100, progress=False)
    assert read_metadata(legacy)["noise"] == "float" and len(read_records(legacy)) == 4
    # CPM's soft votes are not sound for the grid classifier: a grid run takes hard votes
    cpm = certify_run(
        run, tmp_path / "cpm.jsonl", method="cpm", smoothing=grid, max_examples=2, batch_size=100, progress=False
    )
    assert {(r.simplex_map, r.inverse_temperature) for r in read_records(cpm)} == {("argmax", None)}


def test_grid_run_refuses_images_off_its_grid_before_writing(tmp_path, trained_digits_run):
    from stablenet.data import load_dataset
    from stablenet.workflows.certification import certify_dataset

    images, labels = load_dataset("digits", "test")
    out = tmp_path / "off.jsonl"
    params = SmoothingParams(sigma=0.25, n0=10, n=100, noise="grid", levels=255)
    kwargs = dict(method="smoothing", smoothing=params, indices=[0, 1], progress=False)
    with pytest.raises(ValueError, match=r"needs inputs on the grid k / 255 .*; set levels to the grid") as excinfo:
        certify_dataset(trained_digits_run.model, images, labels, out, **kwargs)
    assert "\n" not in str(excinfo.value)
    kwargs["smoothing"] = SmoothingParams(sigma=0.25, n0=10, n=100, noise="grid")
    with pytest.raises(ValueError, match="noise 'grid' needs levels, the grid"):
        certify_dataset(trained_digits_run.model, images, labels, out, **kwargs)
    assert not out.exists() and not (tmp_path / "off.jsonl.meta.json").exists()


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_sharding_merges_to_the_single_process_result(tmp_path, trained_digits_run):
    single = tmp_path / "single.jsonl"
    certify_run(trained_digits_run.run_dir, single, max_examples=40, progress=False)
    sharded = tmp_path / "sharded.jsonl"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "stablenet.cli",
            "--",
            "certify",
            "--run",
            str(trained_digits_run.run_dir),
            "--out",
            str(sharded),
            "--max-examples",
            "40",
            "--quiet",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    strip = lambda rs: [(r.index, r.label, r.prediction, r.radius, r.correct) for r in rs]  # noqa: E731
    assert strip(read_records(sharded)) == strip(read_records(single))
    assert not list(tmp_path.glob("sharded.jsonl.rank*")), "shard files left behind"
    assert json.loads(Path(str(sharded) + ".meta.json").read_text())["method"] == "lipschitz"
