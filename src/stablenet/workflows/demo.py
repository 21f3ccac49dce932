"""The demo: train ``sll_mlp`` on scikit-learn's bundled digits, certify the test set, write the report and the
model's audit (:mod:`stablenet.workflows.audit`, quick settings).

Needs no download. Rerunning it resumes (or reuses) what an earlier, possibly killed, run left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stablenet.certify.records import read_records
from stablenet.train.checkpoint import TRAIN_STATE_FILE
from stablenet.train.config import TrainConfig
from stablenet.train.trainer import train
from stablenet.workflows.audit import AuditSettings, audit_run
from stablenet.workflows.certification import certify_run
from stablenet.workflows.report import STANDARD_RADII, certified_accuracy, write_report

__all__ = ["DEMO_CONFIG", "DemoResult", "demo_summary", "run_demo"]

#: The demo's training configuration (also in ``configs/digits_sll_mlp.yaml``).
DEMO_CONFIG = {
    "dataset": "digits",
    "model": "sll_mlp",
    "model_args": {"width": 128, "depth": 4, "inner_width": 256},
    "epochs": 60,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 0.003,
    "schedule": "cosine",
    "loss": "offset_ce",
    "loss_offset": 1.0,
    "loss_temperature": 0.25,
    "seed": 0,
    "device": "cpu",
}


@dataclass
class DemoResult:
    run_dir: Path
    records: Path
    report: Path
    audit: Path | None = None


def run_demo(out: str | os.PathLike = "runs/demo", *, progress: bool = True) -> DemoResult:
    """Train, certify, report and audit under ``out`` (``out/train``, ``out/certify_lipschitz.jsonl``,
    ``out/report``, ``out/audit/audit.html``)."""
    out = Path(out)
    config = TrainConfig.from_dict({**DEMO_CONFIG, "out": str(out / "train")})
    result = train(config, resume=(out / "train" / TRAIN_STATE_FILE).exists(), progress=progress)
    records = certify_run(result.run_dir, out / "certify_lipschitz.jsonl", method="lipschitz", progress=progress)
    report = write_report([records], out / "report", names=["sll_mlp (Lipschitz margin)"])
    # quick settings on the whole digits test split (360 images): a few seconds
    audit_run(result.run_dir, out / "audit", AuditSettings.for_quick(max_examples=400), progress=progress)
    return DemoResult(run_dir=result.run_dir, records=records, report=report, audit=out / "audit" / "audit.html")


def demo_summary(result: DemoResult) -> str:
    """One line from the demo's records: clean accuracy and certified accuracy at the digits' standard radii."""
    records = read_records(result.records)
    radii = STANDARD_RADII["digits"]
    accs = certified_accuracy(records, (0.0, *radii))
    cert = ", ".join(f"{r:g}: {100 * a:.1f}%" for r, a in zip(radii, accs[1:], strict=True))
    return f"digits test set ({len(records)} images): clean accuracy {100 * accs[0]:.1f}%, certified (l2) {cert}"
