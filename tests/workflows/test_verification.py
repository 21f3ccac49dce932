"""``verify``: certified predictions survive PGD at 0.99 x radius; inflated certificates do not."""

import json
import logging
import math

import pytest
import torch
from torch import nn

from stablenet.certify.lipschitz import certify_lipschitz
from stablenet.certify.records import ABSTAIN, CertificationRecord, RecordWriter, read_metadata, read_records
from stablenet.cli import main
from stablenet.models import load_model
from stablenet.train import TrainConfig, train
from stablenet.workflows.certification import certify_run
from stablenet.workflows.verification import RADIUS_FACTOR, verify_records, verify_run


@pytest.fixture(scope="module")
def lipschitz_run(tmp_path_factory):
    """A 3-epoch sll_mlp on digits and its Lipschitz records (a few seconds on 2 cores)."""
    out = tmp_path_factory.mktemp("verify")
    config = TrainConfig(
        dataset="digits", model_args={"width": 64, "depth": 2}, epochs=3, device="cpu", out=str(out / "run")
    )
    torch.manual_seed(0)
    train(config, progress=False)
    records = certify_run(out / "run", out / "lipschitz.jsonl", progress=False)
    return out / "run", records


def _rewrite(src, dst, radius_scale=1.0, **meta):
    """Copy a record file with radii scaled and metadata updated (a fake certifier)."""
    records = [CertificationRecord(**{**r.to_dict(), "radius": r.radius * radius_scale}) for r in read_records(src)]
    with RecordWriter(dst, metadata={**read_metadata(src), **meta}) as writer:
        writer.write(records)
    return dst


def test_sound_certificates_are_not_broken(lipschitz_run, tmp_path):
    run, records = lipschitz_run
    result = verify_run(run, records, steps=10, restarts=2, max_examples=128)
    n_cert = sum(r.radius > 0 for r in read_records(records))
    assert result.method == "lipschitz" and not result.empirical
    assert result.n_certified == n_cert > 128 and result.n_attacked == 128
    assert result.n_broken == 0 and result.broken_indices == [] and result.ok
    for d in result.details:
        assert d["attack_radius"] == pytest.approx(RADIUS_FACTOR * d["radius"])
        assert d["distance"] <= d["attack_radius"] * (1 + 1e-5) + 1e-6
        assert d["clean_prediction"] == d["prediction"] == d["adversarial_prediction"]
    out = tmp_path / "verify.json"
    args = ["verify", "--run", str(run), "--records", str(records), "--max-examples", "20", "--steps", "5"]
    assert main([*args, "--device", "cpu", "--json", str(out), "--quiet"]) == 0
    saved = json.loads(out.read_text())
    assert saved["n_attacked"] == 20 and saved["n_broken"] == 0 and len(saved["details"]) == 20


def test_inflated_certificates_are_broken(lipschitz_run, tmp_path, capsys):
    run, records = lipschitz_run
    fake = _rewrite(records, tmp_path / "inflated.jsonl", radius_scale=10.0)
    result = verify_run(run, fake, steps=10, restarts=1, max_examples=64)
    assert result.n_attacked == 64
    assert result.n_broken > 0 and result.n_broken == len(result.broken_indices)
    broken = [d for d in result.details if d["broken"]]
    assert all(d["adversarial_prediction"] != d["prediction"] for d in broken)
    assert all(d["distance"] <= d["attack_radius"] * (1 + 1e-5) for d in broken)

    args = ["verify", "--run", str(run), "--records", str(fake), "--max-examples", "64", "--steps", "10"]
    assert main([*args, "--device", "cpu", "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert f"broken: {result.n_broken}" in printed
    assert "broken indices: " + ", ".join(map(str, result.broken_indices)) in printed


def test_exact_radius_of_a_linear_model():
    # Two classes, logits W x: the prediction is constant exactly on the ball of radius margin / ||w0 - w1||.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2, bias=False))
    x = torch.randn(16, 1, 2, 3)
    with torch.no_grad():
        logits = model(x)
        w = model[1].weight
        exact = (logits[:, 0] - logits[:, 1]).abs() / (w[0] - w[1]).norm()
    pred = logits.argmax(1)

    def records(scale):
        return [
            CertificationRecord(i, int(p), int(p), float(r) * scale, True, "lipschitz", "l2", 0.0)
            for i, (p, r) in enumerate(zip(pred, exact, strict=True))
        ]

    tight = verify_records(model, x, records(0.9999), method="lipschitz", steps=10, restarts=1, batch_size=5)
    assert tight.n_attacked == 16 and tight.n_broken == 0
    # At 1.02 x the exact radius the attack radius 0.99 * 1.02 exceeds it: every certificate falls.
    loose = verify_records(model, x, records(1.02), method="lipschitz", steps=10, restarts=1, batch_size=5)
    assert loose.n_broken == 16 and loose.broken_indices == list(range(16))


def test_lipschitz_records_are_attacked_in_the_arithmetic_they_certify():
    """Hidden unit x + 2**19: float32 rounds x = 0.52 to 0.5, so the float32 and float64 networks disagree there
    (logits (1.0, 1.01) against (1.04, 1.01)); a float64 certificate holds, and attacking float32 breaks it."""
    big = 2.0**19
    model = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [0.0]]))
        model[0].bias.copy_(torch.tensor([big, 0.0]))
        model[1].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
        model[1].bias.copy_(torch.tensor([-2 * big, 1.01]))
    x = torch.tensor([[0.52]])
    pred, radius = certify_lipschitz(model, x)  # float64 by default
    assert pred.item() == 0 and radius.item() > 0
    record = [CertificationRecord(0, 0, 0, radius.item(), True, "lipschitz", "l2", 0.0)]
    ok = verify_records(model, x, record, method="lipschitz", steps=5, restarts=1)
    assert ok.n_broken == 0 and ok.details[0]["clean_prediction"] == 0
    wrong = verify_records(model, x, record, method="lipschitz", steps=5, restarts=1, arithmetic="native")
    assert wrong.n_broken == 1 and wrong.details[0]["clean_prediction"] == 1


def test_abstentions_and_zero_radii_are_not_attacked():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(3, 1, 2, 2)
    recs = [
        CertificationRecord(0, 1, ABSTAIN, 0.0, False, "lipschitz", "l2", 0.0),
        CertificationRecord(1, 1, 2, 0.0, False, "lipschitz", "l2", 0.0),
    ]
    result = verify_records(model, x, recs, method="lipschitz")
    assert (result.n_records, result.n_certified, result.n_attacked, result.n_broken) == (2, 0, 0, 0)


def test_bad_inputs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(3, 1, 2, 2)
    rec = CertificationRecord(0, 1, 1, 0.1, True, "lipschitz", "l2", 0.0)
    with pytest.raises(ValueError, match="method must be one of lipschitz, smoothing, lvm-rs, cpm; got 'ibp'"):
        verify_records(model, x, [rec], method="ibp")
    with pytest.raises(ValueError, match="expected method 'smoothing'"):
        verify_records(model, x, [rec], method="smoothing", sigma=0.25)
    smooth_rec = CertificationRecord(0, 1, 1, 0.1, True, "smoothing", "l2", 0.0)
    with pytest.raises(ValueError, match="needs the smoothing noise level sigma > 0; got None"):
        verify_records(model, x, [smooth_rec], method="smoothing")
    far = CertificationRecord(7, 1, 1, 0.1, True, "lipschitz", "l2", 0.0)
    with pytest.raises(ValueError, match="record index 7 is outside the 3 images"):
        verify_records(model, x, [far], method="lipschitz")


def test_cli_bad_attack_is_one_line_exit_2(lipschitz_run, capsys):
    run, records = lipschitz_run
    assert main(["verify", "--run", str(run), "--records", str(records), "--attack", "fgsm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stablenet: error: attack must be one of pgd; got 'fgsm'")
    assert len(err.strip().splitlines()) == 1


def test_smoothing_records_without_sigma_are_refused(lipschitz_run, tmp_path):
    run, _ = lipschitz_run
    fake = _smoothing_records(run, tmp_path / "smooth.jsonl", radius=0.1, sigma=None)
    with pytest.raises(ValueError, match="has no 'sigma'; smoothing records need their noise level"):
        verify_run(run, fake)


def _smoothing_records(run, path, radius, sigma, count=6, n=200):
    """Hand-made smoothing records on the first digits test images, predicting the base model's class."""
    from stablenet.data import load_dataset

    images, labels = load_dataset("digits", "test")
    with torch.no_grad():
        pred = load_model(run)(images[:count]).argmax(1)
    records = [
        CertificationRecord(i, int(y), int(p), radius, int(p) == int(y), "smoothing", "l2", 0.0)
        for i, (y, p) in enumerate(zip(labels[:count], pred, strict=True))
    ]
    meta = {"dataset": "digits", "split": "test", "run": str(run), "method": "smoothing", "n": n, "alpha": 0.001}
    if sigma is not None:
        meta["sigma"] = sigma
    with RecordWriter(path, metadata=meta) as writer:
        writer.write(records)
    return path


def test_smoothing_verify_runs_and_counts(lipschitz_run, tmp_path):
    pytest.importorskip("stablenet.smoothing.cohen")
    run, _ = lipschitz_run
    small = _smoothing_records(run, tmp_path / "small.jsonl", radius=0.05, sigma=0.25)
    result = verify_run(run, small, steps=5, restarts=1)
    assert result.method == "smoothing" and result.empirical
    assert result.n_records == result.n_certified == result.n_attacked == 6
    assert 0 <= result.n_broken <= 6 and len(result.details) == 6
    for d in result.details:
        assert d["adversarial_prediction"] in [ABSTAIN, *range(10)]
        assert d["distance"] <= d["attack_radius"] * (1 + 1e-5) + 1e-6
    # Radius 50 in an 8x8 image space (pixels in [0, 1]) is absurd: the attack moves the smoothed class.
    huge = _smoothing_records(run, tmp_path / "huge.jsonl", radius=50.0, sigma=0.25)
    broken = verify_run(run, huge, steps=10, restarts=1)
    assert broken.n_broken >= 1
    assert all(d["adversarial_prediction"] not in (ABSTAIN, d["prediction"]) for d in broken.details if d["broken"])
    assert math.isfinite(sum(d["distance"] for d in broken.details))


# ------------------------------------------------------------------------ the classifier each method certifies
def _asymmetric_model() -> nn.Module:
    """Logits ``(0, 0.1 relu(y) - 20 relu(-y))`` of a scalar input ``y`` (shaped ``(1, 1, 1)``).

    At ``y = 0.5`` under ``N(0, 1)`` noise (trapezoid integration, see tests/smoothing/test_soft.py): hard votes
    for class 1 with probability 0.69, but mean scores of class 1 are 0.375 (softmax, s = 1) and 0.385 (sparsemax,
    s = 1): the smoothed hard classifier says 1, the smoothed soft ones say 0.
    """
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[3].weight.copy_(torch.tensor([[0.0, 0.0], [0.1, -20.0]]))
    return model.eval()


def _two_claims(method, **fields):
    """Record 0 claims class 0 (the soft classifiers' answer), record 1 class 1 (the hard one's), same input."""
    return [CertificationRecord(i, i, i, 1e-3, True, method, "l2", 0.0, **fields) for i in (0, 1)]


_SOFT_CHECK = dict(sigma=1.0, steps=2, restarts=1, smoothing_n=4000, alpha=0.001, eot_samples=4)


@pytest.mark.parametrize(
    ("method", "fields", "broken"),
    [
        ("lvm-rs", dict(simplex_map="softmax", inverse_temperature=1.0), [1]),
        ("lvm-rs", dict(simplex_map="sparsemax", inverse_temperature=1.0), [1]),
        ("cpm", dict(simplex_map="softmax", inverse_temperature=1.0), [1]),
        ("cpm", dict(simplex_map="argmax"), [0]),
        ("smoothing", {}, [0]),
    ],
)
def test_each_record_is_checked_against_the_classifier_its_method_certifies(method, fields, broken):
    x = torch.full((2, 1, 1, 1), 0.5)
    records = _two_claims(method, **fields)
    result = verify_records(
        _asymmetric_model(), x, records, method=method, generator=torch.Generator().manual_seed(0), **_SOFT_CHECK
    )
    assert result.n_attacked == 2 and result.broken_indices == broken
    for d in result.details:
        assert d["adversarial_prediction"] == (1 if broken == [0] else 0)
        assert d["simplex_map"] == fields.get("simplex_map", "argmax")
        assert d["inverse_temperature"] == fields.get("inverse_temperature")
        assert d["map_source"] == ("method" if method == "smoothing" else "record")


def test_old_records_without_the_classifier_fields_still_verify(caplog):
    from stablenet.smoothing.lvm import LVMSmooth

    x = torch.full((2, 1, 1, 1), 0.5)
    model = _asymmetric_model()
    gen = torch.Generator().manual_seed(0)
    # cpm: the model has a finite Lipschitz bound, so certify_run would have used soft votes at s = 1.
    with caplog.at_level(logging.INFO, logger="stablenet.workflows.verification"):
        cpm = verify_records(model, x, _two_claims("cpm"), method="cpm", generator=gen, **_SOFT_CHECK)
    assert cpm.broken_indices == [1]
    for d in cpm.details:
        assert (d["simplex_map"], d["inverse_temperature"], d["map_source"]) == ("softmax", 1.0, "re-derived")
    assert "2 cpm records name no simplex_map; re-derived" in caplog.text
    caplog.clear()
    # lvm-rs: the choice cannot be replayed; it is re-selected on fresh draws, with one warning line.
    with caplog.at_level(logging.WARNING, logger="stablenet.workflows.verification"):
        lvm = verify_records(
            model, x, _two_claims("lvm-rs"), method="lvm-rs", generator=gen, certify_n0=50, **_SOFT_CHECK
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "simplex_map" in r.getMessage()]
    assert len(warnings) == 1 and "2 lvm-rs records name no simplex_map" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    defaults = LVMSmooth(model, 2, 1.0)
    for d in lvm.details:
        assert d["map_source"] == "re-selected"
        assert d["simplex_map"] in defaults.maps and d["inverse_temperature"] in defaults.temperatures
    assert lvm.n_attacked == 2


def test_records_naming_a_classifier_their_method_does_not_certify_are_refused():
    x = torch.full((1, 1, 1, 1), 0.5)
    bad = [
        ("lvm-rs", dict(simplex_map="argmax"), "lvm-rs certifies simplex_map 'softmax' or 'sparsemax'; got 'argmax'"),
        ("cpm", dict(simplex_map="sparsemax", inverse_temperature=1.0), "cpm certifies simplex_map 'softmax' or"),
        ("smoothing", dict(simplex_map="softmax", inverse_temperature=1.0), "smoothing certifies simplex_map 'argmax'"),
        ("lvm-rs", dict(simplex_map="softmax"), "simplex_map 'softmax' needs an inverse_temperature; got None"),
    ]
    for method, fields, match in bad:
        record = CertificationRecord(0, 0, 0, 0.1, True, method, "l2", 0.0, **fields)
        with pytest.raises(ValueError, match=match):
            verify_records(_asymmetric_model(), x, [record], method=method, sigma=1.0, smoothing_n=10)


@pytest.mark.parametrize("method", ["lvm-rs", "cpm"])
def test_certify_run_records_the_classifier_and_verify_uses_it(lipschitz_run, tmp_path, method):
    from stablenet.data import load_dataset
    from stablenet.workflows.certification import SmoothingParams

    run, _ = lipschitz_run
    params = SmoothingParams(sigma=0.25, n0=20, n=400, alpha=0.01)
    out = certify_run(
        run,
        tmp_path / f"{method}.jsonl",
        method=method,
        smoothing=params,
        max_examples=4,
        batch_size=400,
        progress=False,
    )
    records = read_records(out)
    assert all(r.simplex_map is not None for r in records)
    if method == "cpm":  # an sll_mlp has a Lipschitz bound: soft votes at the chosen s, or hard votes
        from stablenet.smoothing.cpm import CPM_TEMPERATURES

        allowed = {("argmax", None)} | {("softmax", s) for s in CPM_TEMPERATURES}
        assert {(r.simplex_map, r.inverse_temperature) for r in records} <= allowed
    # Such a small model abstains often (CPM's flat softmax scores): claim the base model's classes at a small
    # radius instead, keeping each record's classifier, so that every record is attacked.
    images, _ = load_dataset("digits", "test")
    with torch.no_grad():
        base = load_model(run)(images[: len(records)]).argmax(1).tolist()
    claims = [
        CertificationRecord(**{**r.to_dict(), "prediction": p, "radius": 0.01, "correct": p == r.label})
        for r, p in zip(records, base, strict=True)
    ]
    claimed = tmp_path / f"{method}-claims.jsonl"
    with RecordWriter(claimed, metadata=read_metadata(out)) as writer:
        writer.write(claims)
    result = verify_run(run, claimed, steps=2, restarts=1, smoothing_n=400)
    assert result.n_attacked == len(records) == 4
    by_index = {r.index: r for r in records}
    for d in result.details:
        r = by_index[d["index"]]
        assert (d["simplex_map"], d["inverse_temperature"]) == (r.simplex_map, r.inverse_temperature)
        assert d["map_source"] == "record"


# ------------------------------------------------------------------------------------------- grid-noise records
class _OnGrid(nn.Module):
    """Class 1 iff the input is (within 1e-3 steps) a grid point k / 255, plus a tiny slope for PGD's gradient.

    Its grid classifier (grid noise, Note [grid records]) is class 1 everywhere; its float-noise smoothed classifier
    is class 0 everywhere (a float Gaussian sample is almost never within 1e-3 steps of the grid).
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = z.flatten(1)[:, :1].to(torch.float64)
        on = ((first * 255 - (first * 255).round()).abs() < 1e-3).to(z.dtype)
        return torch.cat([torch.zeros_like(on), 10 * on - 5 + 1e-3 * z.flatten(1)[:, :1]], dim=1)


@pytest.mark.parametrize(
    ("method", "fields"), [("smoothing", {}), ("lvm-rs", dict(simplex_map="softmax", inverse_temperature=1.0))]
)
def test_grid_records_are_checked_with_grid_noise_at_grid_points(method, fields):
    x = torch.tensor([100.0, 3.0, 255.0]).view(3, 1, 1, 1) / 255
    records = [CertificationRecord(i, 1, 1, 0.05, True, method, "l2", 0.0, **fields) for i in range(3)]
    check = dict(method=method, sigma=0.5, steps=3, restarts=2, smoothing_n=400, alpha=0.001, eot_samples=4)
    grid = verify_records(
        _OnGrid(), x, records, generator=torch.Generator().manual_seed(0), noise="grid", levels=255, **check
    )
    assert grid.n_attacked == 3 and grid.broken_indices == []
    for d in grid.details:
        assert (d["noise"], d["levels"], d["adversarial_prediction"]) == ("grid", 255, 1)
        assert d["grid_rounding"] in ("nearest", "toward input") and d["distance"] <= d["attack_radius"]
    # The same claims checked with float noise: another smoothed classifier, which says 0 everywhere.
    plain = verify_records(_OnGrid(), x, records, generator=torch.Generator().manual_seed(0), **check)
    assert plain.broken_indices == [0, 1, 2] and {d["noise"] for d in plain.details} == {"float"}
    with pytest.raises(ValueError, match="noise 'grid' needs levels, an int >= 1"):
        verify_records(_OnGrid(), x, records, noise="grid", **check)
    with pytest.raises(ValueError, match="noise must be one of 'float', 'grid'; got 'exact'"):
        verify_records(_OnGrid(), x, records, noise="exact", **check)
    with pytest.raises(ValueError, match="needs inputs on the grid k / 255"):
        verify_records(_OnGrid(), x + 0.3 / 255, records, noise="grid", levels=255, **check)


def test_adversarial_points_are_moved_onto_the_grid_inside_the_box_and_the_ball():
    from stablenet.certify.smoothed_attack import onto_grid as _onto_grid

    gen = torch.Generator().manual_seed(0)
    steps = torch.randint(0, 17, (64, 1, 4, 4), generator=gen)
    x = steps.float() / 16
    eps = torch.rand(64, generator=gen, dtype=torch.float64) * 0.5
    direction = torch.randn(64, 1, 4, 4, generator=gen)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_adv = x + direction * eps.float().view(-1, 1, 1, 1)  # on the sphere of radius eps, partly outside [0, 1]
    moved, how = _onto_grid(x, x_adv, steps, 16, eps)
    assert torch.equal(moved * 16, (moved * 16).round()) and moved.min() >= 0 and moved.max() <= 1
    distance = (moved - x).double().flatten(1).norm(dim=1)
    assert torch.all(distance <= eps)
    nearest = ((x_adv * 16).round().clamp(0, 16) / 16 - x).double().flatten(1).norm(dim=1) <= eps
    assert how == ["nearest" if n else "toward input" for n in nearest.tolist()]
    assert {"nearest", "toward input"} <= set(how)


def test_verify_run_evaluates_grid_records_with_their_grid(lipschitz_run, tmp_path, monkeypatch):
    from stablenet.smoothing.cohen import Smooth
    from stablenet.workflows.certification import SmoothingParams

    run, _ = lipschitz_run
    params = SmoothingParams(sigma=0.25, n0=10, n=200, alpha=0.01, noise="grid")
    out = certify_run(
        run, tmp_path / "grid.jsonl", method="smoothing", smoothing=params, max_examples=4, progress=False
    )
    meta = read_metadata(out)
    claims = [
        CertificationRecord(**{**r.to_dict(), "prediction": r.label, "radius": 0.2, "correct": True})
        for r in read_records(out)
    ]
    claimed = tmp_path / "claims.jsonl"
    with RecordWriter(claimed, metadata=meta) as writer:
        writer.write(claims)
    seen = []
    predict = Smooth.predict
    monkeypatch.setattr(
        Smooth, "predict", lambda self, x, *a, **k: seen.append((self.grid, x)) or predict(self, x, *a, **k)
    )
    result = verify_run(run, claimed, steps=2, restarts=1, smoothing_n=200)
    assert result.n_attacked == 4 and {(d["noise"], d["levels"]) for d in result.details} == {("grid", 16)}
    assert len(seen) == 1 and seen[0][0] is not None and seen[0][0].levels == 16 and seen[0][0].sigma == 0.25
    x = seen[0][1]
    assert torch.equal(x * 16, (x * 16).round()) and x.min() >= 0 and x.max() <= 1
    meta.pop("levels")
    (tmp_path / "claims.jsonl.meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="says noise 'grid' but has no 'levels'"):
        verify_run(run, claimed, steps=2, restarts=1, smoothing_n=200)
