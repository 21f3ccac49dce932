"""``stablenet audit`` end to end on a small digits run: every section, numbers equal to the library's own on the
same examples, resume after a kill, plain PyTorch models with modules the walker cannot bound, and bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

from stablenet import cli
from stablenet.certify.attack import pgd_l2
from stablenet.certify.records import read_records
from stablenet.curvature.hessian import Hessian
from stablenet.data import load_dataset
from stablenet.spectral import layer_lipschitz_bounds, lipschitz_upper_bound
from stablenet.workflows import audit as audit_module
from stablenet.workflows.audit import AuditSettings, audit_factory, audit_run
from stablenet.workflows.certification import certify_dataset
from stablenet.workflows.certifiers import SmoothingParams
from stablenet.workflows.report import average_certified_radius, certified_accuracy

TINY = dict(
    max_examples=24,
    n0=32,
    n=200,
    noise_batch_size=400,
    attack_steps=5,
    attack_restarts=1,
    verify_examples=4,
    verify_steps=3,
    verify_restarts=1,
    hessian_examples=64,
    hessian_top_k=1,
    hessian_max_iter=10,
    trace_samples=4,
    landscape_examples=64,
    landscape_resolution=3,
)
SECTIONS = ("subject", "settings", "environment", "stages", "summary", "lipschitz", "certificates", "soundness")


@pytest.fixture(scope="module")
def audited(trained_digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    result = audit_run(trained_digits_run.run_dir, out, AuditSettings(**TINY), progress=False)
    return trained_digits_run, out, result


def test_every_section_and_file_is_written(audited):
    _, out, result = audited
    assert {"audit.json", "audit.md", "audit.html"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "audit.json").read_text()) == json.loads(json.dumps(result))
    assert set(SECTIONS) | {"curvature", "format"} == set(result)
    methods = result["certificates"]["methods"]
    assert sorted(methods) == ["cpm@0.25", "lipschitz", "lvm-rs@0.25", "smoothing@0.25"]
    assert set(result["soundness"]["verify"]) == set(methods)
    assert result["curvature"]["error"] is None and len(result["curvature"]["landscape"]["alphas"]) == 3
    stages = set(result["stages"])
    assert {"clean", "lipschitz", "attack", "hessian", "landscape", "total"} <= stages
    assert {f"certify:{k}" for k in methods} | {f"verify:{k}" for k in methods} <= stages
    text = (out / "audit.html").read_text()
    for heading in ("Summary", "Lipschitz", "Certificates", "Soundness", "Curvature", "Settings"):
        assert f">{heading}" in text


def test_numbers_equal_the_library_on_the_same_examples(audited, tmp_path):
    run, out, result = audited
    model = run.model.eval()
    data = load_dataset("digits", "test")
    n = TINY["max_examples"]
    x, y = data.images[:n], data.labels[:n]
    assert result["certificates"]["indices"] == list(range(n))
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean().item()
    assert result["summary"]["clean_accuracy"] == pytest.approx(clean, abs=1e-12)
    lip = result["lipschitz"]
    assert lip["upper"] == lipschitz_upper_bound(model, (1, 8, 8))
    assert [(e["name"], e["bound"]) for e in lip["layers"]] == layer_lipschitz_bounds(model, (1, 8, 8))
    assert [e["type"] for e in lip["layers"]][-1] == "LinearNormalized"
    assert lip["unbounded"] == [] and lip["lower"] <= lip["upper"]
    assert result["summary"]["tightness"] == pytest.approx(lip["lower"] / lip["upper"])
    radii = result["settings"]["radii"]
    for key, method in result["certificates"]["methods"].items():
        records = read_records(out / method["file"])
        assert sorted(r.index for r in records) == list(range(n))
        assert method["certified_accuracy"] == pytest.approx(list(certified_accuracy(records, radii)), abs=1e-12)
        assert method["acr"] == pytest.approx(average_certified_radius(records), abs=1e-12), key
    # the records themselves: the same as certifying directly with the same settings
    for method, params in (("lipschitz", None), ("smoothing", SmoothingParams(0.25, 32, 200, 0.001, 0))):
        direct = tmp_path / f"{method}.jsonl"
        options = {"batch_size": 400} if params else {}
        certify_dataset(model, data.images, data.labels, direct, method=method, smoothing=params,
                        indices=list(range(n)), progress=False, **options)  # fmt: skip
        key = method if params is None else "smoothing@0.25"
        assert [r.radius for r in read_records(direct)] == result["certificates"]["methods"][key]["radii"]
    # the attack's robust accuracy at the headline radius, recomputed
    at = radii.index(result["settings"]["headline_radius"])
    _, flipped = pgd_l2(model, x, y, radii[at], steps=5, restarts=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    robust = (correct & ~flipped).double().mean().item()
    assert result["soundness"]["attack"]["robust_accuracy"][at] == pytest.approx(robust, abs=1e-12)
    assert result["summary"]["empirical_robust_accuracy"] == result["soundness"]["attack"]["robust_accuracy"][at]
    lipschitz_at = result["certificates"]["methods"]["lipschitz"]["certified_accuracy"][at]
    assert result["summary"]["gap"] == pytest.approx(robust - lipschitz_at, abs=1e-12)  # the model's own certificate
    assert lipschitz_at <= robust  # sound certificates of the model never exceed what the attack leaves
    # the top Hessian eigenvalue with the same data and seed
    hessian = Hessian(model, nn.functional.cross_entropy, [(data.images[:64], data.labels[:64])])
    values, _ = hessian.eigenvalues(k=1, max_iter=10, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert result["curvature"]["top_eigenvalues"][0] == pytest.approx(float(values[0]), rel=1e-9)
    best = result["summary"]["best_method"]
    assert result["summary"]["best_certified_accuracy"] == max(
        m["certified_accuracy"][at] for m in result["certificates"]["methods"].values()
    )
    assert (
        result["certificates"]["methods"][best]["certified_accuracy"][at]
        == result["summary"]["best_certified_accuracy"]
    )
    assert all(v["n_broken"] == 0 for v in result["soundness"]["verify"].values())
    silent = [m["label"] for m in result["certificates"]["methods"].values() if not any(
        r > 0 and c for r, c in zip(m["radii"], m["correct"], strict=True))]  # fmt: skip
    assert result["summary"]["warnings"] == [f"{label} certified none of the {n} examples (it abstained or was wrong)"
                                             for label in silent]  # fmt: skip


def test_html_is_self_contained(audited):
    _, out, _ = audited

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.references = [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs.get("src", ""))
            self.references += [
                v for k, v in attrs.items() if k in ("href", "src") and v and not v.startswith(("data:", "#"))
            ]

    parser = Collect()
    parser.feed((out / "audit.html").read_text())
    assert len(parser.images) >= 4 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert parser.references == []


class Stop(Exception):
    pass


def test_a_killed_audit_resumes_from_its_stages(trained_digits_run, tmp_path, monkeypatch):
    settings = AuditSettings(**TINY)
    real = audit_module.attack_stage

    def die(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(audit_module, "attack_stage", die)
    with pytest.raises(Stop):
        audit_run(trained_digits_run.run_dir, tmp_path, settings, progress=False)
    monkeypatch.setattr(audit_module, "attack_stage", real)
    result = audit_run(trained_digits_run.run_dir, tmp_path, settings, progress=False)
    cached = {name for name, stage in result["stages"].items() if stage["cached"]}
    assert {"clean", "lipschitz", "certify:lipschitz", "verify:cpm@0.25"} <= cached
    assert not {"attack", "hessian", "landscape"} & cached
    again = audit_run(trained_digits_run.run_dir, tmp_path, settings, progress=False)
    assert all(stage["cached"] for name, stage in again["stages"].items() if name != "total")
    assert again["certificates"] == result["certificates"] and again["summary"] == result["summary"]
    with pytest.raises(ValueError, match=r"holds an audit with other settings \(settings.n differ\)"):
        audit_run(trained_digits_run.run_dir, tmp_path, AuditSettings(**{**TINY, "n": 300}), progress=False)


# ------------------------------------------------------------------ plain PyTorch models
class BasicBlock(nn.Module):
    """A torchvision-style residual block: its forward adds, which no rule describes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.layer1(torch.relu(self.stem(x))))


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet()


def not_a_module():
    return "a string"


def mnist_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def test_a_plain_resnet_lists_the_modules_it_cannot_bound(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    settings = AuditSettings(**{**TINY, "verify_examples": 0})
    result = audit_factory("test_audit:tiny_resnet", "digits", tmp_path, settings, progress=False)
    unbounded = result["lipschitz"]["unbounded"]
    assert [(m["name"], m["type"]) for m in unbounded] == [
        ("<root>", "TinyResNet"),
        ("layer1.0", "BasicBlock"),
        ("layer1.1", "BasicBlock"),
    ]
    assert result["lipschitz"]["upper"] is None and result["summary"]["tightness"] is None
    assert "lipschitz" not in result["certificates"]["methods"] and result["certificates"]["methods"]
    assert any("layer1.0 (BasicBlock)" in w for w in result["summary"]["warnings"])
    assert "BasicBlock" in (tmp_path / "audit.html").read_text()
    assert result["subject"]["kind"] == "factory" and result["subject"]["factory"] == "test_audit:tiny_resnet"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run", "RUN_WITHOUT_CHECKPOINT"], "has no checkpoint (model.safetensors)"),
        (["--model", "no_such_module_xyz:f", "--data", "digits"], "cannot import module 'no_such_module_xyz'"),
        (["--model", "test_audit:missing", "--data", "digits"], "has no callable 'missing'"),
        (["--model", "test_audit:not_a_module", "--data", "digits"], "returned str, not a torch.nn.Module"),
        (["--model", "test_audit:mnist_mlp", "--data", "digits"], "the model does not accept digits images of shape"),
        (["--model", "test_audit:tiny_resnet", "--data", "nope"], "data must be one of"),
        (["--model", "test_audit:tiny_resnet"], "--model needs --data NAME"),
        (["--model", "tiny_resnet", "--data", "digits"], "model must be given as module:function"),
        (["--run", "RUN", "--sigma", "0"], "sigma must be > 0; got 0.0"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, trained_digits_run, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    argv = [str(trained_digits_run.run_dir) if a == "RUN" else str(tmp_path) if a == "RUN_WITHOUT_CHECKPOINT" else a
            for a in argv]  # fmt: skip
    assert cli.main(["audit", *argv, "--quick", "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_command_prints_the_summary(trained_digits_run, tmp_path, capsys):
    argv = ["audit", "--run", str(trained_digits_run.run_dir), "--quick", "--max-examples", "16", "--n", "200"]
    assert cli.main([*argv, "--quiet", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads((tmp_path / "audit.json").read_text())
    assert result["settings"]["num_examples"] == 16 and result["settings"]["smoothing"]["n"] == 200
    summary = result["summary"]
    assert lines[0].startswith(f"clean accuracy {100 * summary['clean_accuracy']:.1f}%")
    assert re.search(r"audit in [\d.]+ s: .*audit\.html$", lines[-1])


# ------------------------------------------------------------------ as a browser shows it
PROBE = """<script>
window.addEventListener('load', () => {
  const next = document.getElementById('lipschitz');
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.setAttribute('data-probe', JSON.stringify({
    summaryEnd: next ? next.getBoundingClientRect().top : -1, images: document.images.length, broken,
    width: document.documentElement.scrollWidth}));
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_chromium_shows_the_summary_on_the_first_screen_and_every_image(audited, tmp_path):
    _, out, _ = audited
    probe = tmp_path / "probe.html"  # a copy with a probe script; the audit itself has none
    probe.write_text((out / "audit.html").read_text().replace("</body>", PROBE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    found = re.search(r'data-probe="([^"]+)"', dom)
    assert found, dom[-2000:]
    layout = json.loads(found.group(1).replace("&quot;", '"'))
    assert 0 < layout["summaryEnd"] <= 800, layout  # the next section starts within the first screen
    assert layout["images"] >= 4 and layout["broken"] == 0 and layout["width"] <= 1280, layout
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", *flags[:3], "--window-size=1280,2400", f"--screenshot={shot}", (out / "audit.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_module_runs_as_a_script_free_of_the_test_package():
    # the factory spec imports this file as the top-level module test_audit: it must import cleanly on its own
    proc = subprocess.run(
        [sys.executable, "-c", "import test_audit; print(type(test_audit.tiny_resnet()).__name__)"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "TinyResNet", proc.stderr[-2000:]
