"""Certification runs: smoothing methods through the runner, sharding under torchrun, and the certifier registry."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# ----------------------------------------------------------------------------------------- certifier registry
@pytest.fixture
def registry(monkeypatch):
    """The certifier registry, restored after the test."""
    from stablenet.workflows import certifiers

    monkeypatch.setattr(certifiers, "_CERTIFIERS", dict(certifiers._CERTIFIERS))
    return certifiers


def _digits(run, count):
    from stablenet.data import load_dataset

    images, labels = load_dataset("digits", "test")
    return run.model, images[:count], labels[:count]


def test_builtin_certifiers_are_registered_in_order():
    from stablenet.workflows.certification import CERTIFY_METHODS, SMOOTHING_METHODS, list_certifiers

    assert CERTIFY_METHODS == ("lipschitz", "smoothing", "lvm-rs", "cpm")
    assert SMOOTHING_METHODS == ("smoothing", "lvm-rs", "cpm")
    assert list_certifiers()[:4] == CERTIFY_METHODS and list_certifiers(randomized=False)[0] == "lipschitz"


def test_a_registered_certifier_runs_by_name(tmp_path, trained_digits_run, registry):
    from stablenet.workflows.certification import certify_dataset

    built = []

    def zero_radius(model, settings):  # a factory returning a ready certifier x -> (prediction, radius)
        built.append(settings)
        return lambda x: (model(x).argmax(1), torch.zeros(len(x), dtype=torch.float64))

    registry.register_certifier("zero-radius", zero_radius)
    registry.register_certifier("zero-radius", zero_radius)  # the same factory again: a no-op
    assert "zero-radius" in registry.list_certifiers(randomized=False)
    model, images, labels = _digits(trained_digits_run, 5)
    out = certify_dataset(
        model, images, labels, tmp_path / "z.jsonl", method="zero-radius", batch_size=2, progress=False
    )
    records = read_records(out)
    assert [r.index for r in records] == list(range(5)) and {r.method for r in records} == {"zero-radius"}
    assert all(r.radius == 0.0 and r.simplex_map is None for r in records)
    assert read_metadata(out)["method"] == "zero-radius"
    assert built[0].input_shape == tuple(images.shape[1:]) and built[0].batch_size == 2
    with pytest.raises(ValueError, match="certifier name 'zero-radius' is already registered"):
        registry.register_certifier("zero-radius", lambda model, settings: zero_radius(model, settings))


def test_a_certifier_callable_is_accepted_where_a_name_is(tmp_path, trained_digits_run):
    from stablenet.certify.lipschitz import LipschitzCertifier
    from stablenet.workflows.certification import certify_dataset

    model, images, labels = _digits(trained_digits_run, 6)
    by_name = read_records(certify_dataset(model, images, labels, tmp_path / "a.jsonl", progress=False))
    ready = LipschitzCertifier(model, input_shape=tuple(images.shape[1:]))
    out = certify_dataset(model, images, labels, tmp_path / "b.jsonl", method=ready, progress=False)
    as_callable = read_records(out)
    assert [(r.prediction, r.radius) for r in as_callable] == [(r.prediction, r.radius) for r in by_name]
    assert {r.method for r in as_callable} == {"LipschitzCertifier"}  # the callable's (type's) name
    named = certify_dataset(
        model, images, labels, tmp_path / "c.jsonl", method=ready, method_name="mine", progress=False
    )
    assert {r.method for r in read_records(named)} == {"mine"} and read_metadata(named)["method"] == "mine"

    def bad(x):
        return torch.zeros(len(x) + 1, dtype=torch.long), torch.zeros(len(x))

    with pytest.raises(ValueError, match=r"certifier 'bad' must return \(prediction, radius\) of shape \(6,\) each"):
        certify_dataset(model, images, labels, tmp_path / "d.jsonl", method=bad, progress=False)


def test_a_registered_randomized_certifier_gets_the_monte_carlo_settings(tmp_path, trained_digits_run, registry):
    from stablenet.workflows.certification import certify_dataset

    seen = []

    @registry.register_certifier("seeded", randomized=True)
    def seeded(model, settings):
        def certify(x, first_index):
            seen.append(first_index)
            return model(x).argmax(1), torch.full((len(x),), 0.5, dtype=torch.float64), [("softmax", 1.0)] * len(x)

        return registry.Certifier(certify, chunk=3, metadata={"sigma": settings.smoothing.sigma})

    assert registry.is_randomized("seeded") and "seeded" in registry.list_certifiers(randomized=True)
    model, images, labels = _digits(trained_digits_run, 7)
    params = SmoothingParams(sigma=0.25, n0=10, n=100)
    out = certify_dataset(
        model, images, labels, tmp_path / "s.jsonl", method="seeded", smoothing=params, progress=False
    )
    assert seen == [0, 3, 6]  # chunks of 3, each called with the index of its first example
    assert {(r.method, r.simplex_map, r.inverse_temperature) for r in read_records(out)} == {("seeded", "softmax", 1.0)}
    assert read_metadata(out)["sigma"] == 0.25
    with pytest.raises(ValueError, match="method 'seeded' needs smoothing parameters"):
        certify_dataset(model, images, labels, tmp_path / "t.jsonl", method="seeded", progress=False)


def test_certifier_builds_the_builtins_by_name(trained_digits_run):
    from stablenet.workflows.certification import certifier

    model, images, _ = _digits(trained_digits_run, 4)
    lipschitz = certifier("lipschitz", model, input_shape=tuple(images.shape[1:]))
    pred, radius, choices = lipschitz.certify(images, 0)
    assert pred.shape == radius.shape == (4,) and choices == [(None, None)] * 4
    assert lipschitz.metadata["arithmetic"] == "float64" and lipschitz.chunk == 256
    params = SmoothingParams(sigma=0.25, n0=10, n=100)
    with pytest.raises(ValueError, match="method 'cpm' needs num_classes"):
        certifier("cpm", model, input_shape=tuple(images.shape[1:]), smoothing=params)
    cohen = certifier("smoothing", model, input_shape=tuple(images.shape[1:]), smoothing=params, num_classes=10)
    assert cohen.chunk == 25 and cohen.metadata["n0"] == 10 and cohen.metadata["noise"] == "float"


def test_an_unknown_certifier_is_a_one_line_error_naming_the_accepted_ones(tmp_path, trained_digits_run):
    from stablenet.workflows.certification import certifier, certify_dataset

    model, images, labels = _digits(trained_digits_run, 2)
    for call in (
        lambda: certify_dataset(model, images, labels, tmp_path / "x.jsonl", method="ibp", progress=False),
        lambda: certifier("ibp", model, input_shape=(1, 8, 8)),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert message.startswith("method must be one of lipschitz, smoothing, lvm-rs, cpm") and "\n" not in message
        assert message.endswith("or a callable x -> (prediction, radius); got 'ibp'")
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(ValueError, match=r"certifier settings must be among input_shape, .*; got input_size"):
        certifier("lipschitz", model, input_size=(1, 8, 8))
