"""``benchmarks/README.md``'s tables are what ``benchmarks/tables.py`` generates from the committed result files."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "benchmarks" / "tables.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TABLES), *args], capture_output=True, text=True, cwd=ROOT, check=False)


def test_committed_tables_equal_the_generated_ones():
    done = _run("--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_names_the_table_that_differs(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "benchmarks" / "README.md").read_text()
    readme.write_text(text.replace("| sll | 64 | 1.53 |", "| sll | 64 | 1.50 |", 1))
    done = _run("--check", "--readme", str(readme))
    assert done.returncode == 1
    assert len(done.stdout.splitlines()) == 1 and "table 'layers-gpu' differs" in done.stdout
    assert _run("--readme", str(readme)).returncode == 0  # write mode regenerates it
    assert readme.read_text() == text


def _tables_module():
    sys.path.insert(0, str(TABLES.parent))
    try:
        import tables
    finally:
        sys.path.remove(str(TABLES.parent))
    return tables


def test_every_result_file_in_a_table_exists_and_old_rows_say_not_recorded():
    tables = _tables_module()
    for path in tables.WRITTEN:
        assert (tables.RESULTS / path).is_file(), path
    line = tables.describe("cpu/bench_layers_session13.jsonl")
    assert "machine not recorded" in line and "committed in 3e09863 on 2026-11-26" in line


def test_sources_come_from_the_rows_provenance(tmp_path, monkeypatch):
    from stablenet.bench import write_rows

    tables = _tables_module()
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    write_rows(
        [{"device": "cpu", "value": 1.0}], tmp_path / "rows.jsonl", command="stablenet bench x --json rows.jsonl"
    )
    record = json.loads((tmp_path / "rows.jsonl").read_text())["provenance"]
    line = tables.describe("rows.jsonl")
    assert f"machine {record['device']};" in line and "command `stablenet bench x --json rows.jsonl`" in line
    assert f"date {record['date'][:10]};" in line and f"torch {record['torch']}" in line
    assert "not recorded" not in line or record["commit"] is None


def test_merge_runs_indexes_each_row(tmp_path):
    for i in (1, 2):
        (tmp_path / f"r{i}.jsonl").write_text(json.dumps({"x": i}) + "\n" + json.dumps({"y": i}) + "\n")
    out = tmp_path / "merged.jsonl"
    script = ROOT / "benchmarks" / "merge_runs.py"
    args = [str(out), f"before={tmp_path / 'r1.jsonl'}", f"before={tmp_path / 'r2.jsonl'}"]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["run"], r["variant"]) for r in rows] == [(1, "before"), (1, "before"), (2, "before"), (2, "before")]
