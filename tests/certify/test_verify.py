"""``verify``: certified predictions survive PGD at 0.99 x radius; inflated certificates do not."""

import json
import math

import pytest
import torch
from torch import nn

from stablenet.certify.records import ABSTAIN, CertificationRecord, RecordWriter, read_metadata, read_records
from stablenet.certify.run import certify_run
from stablenet.certify.verify import RADIUS_FACTOR, verify_records, verify_run
from stablenet.cli import main
from stablenet.train import TrainConfig, load_model, train


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
