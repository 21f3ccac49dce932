"""The demo's summary line, as ``stablenet demo`` prints it."""

import re

from stablenet import cli
from stablenet.certify.records import read_records
from stablenet.workflows.demo import DemoResult, demo_summary
from stablenet.workflows.report import STANDARD_RADII, certified_accuracy


def test_summary_states_clean_and_certified_accuracy(trained_digits_run, tmp_path, monkeypatch, capsys):
    records = tmp_path / "certify_lipschitz.jsonl"
    assert cli.main(["certify", "--run", str(trained_digits_run.run_dir), "--out", str(records), "--quiet"]) == 0
    result = DemoResult(run_dir=trained_digits_run.run_dir, records=records, report=tmp_path / "report" / "report.md")
    summary = demo_summary(result)
    n = len(read_records(records))
    clean, *certified = certified_accuracy(read_records(records), (0.0, *STANDARD_RADII["digits"]))
    assert summary.startswith(f"digits test set ({n} images): clean accuracy {100 * clean:.1f}%, certified (l2) ")
    assert re.findall(r"(\S+): (\d+\.\d)%", summary) == [
        (f"{r:g}", f"{100 * a:.1f}") for r, a in zip(STANDARD_RADII["digits"], certified, strict=True)
    ]
    # the command prints the same line after running the demo
    monkeypatch.setattr("stablenet.cli.demo.run_demo", lambda out, progress: result)
    assert cli.main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == summary and lines[-1].endswith(f"report: {result.report}")
    audited = DemoResult(result.run_dir, result.records, result.report, audit=tmp_path / "audit" / "audit.html")
    monkeypatch.setattr("stablenet.cli.demo.run_demo", lambda out, progress: audited)
    assert cli.main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"audit (open in a browser): {audited.audit}"
