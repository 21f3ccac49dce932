"""Merge repeated runs of one measurement into one JSON Lines file, each row with its ``run`` index.

    python benchmarks/merge_runs.py OUT.jsonl RUN1.jsonl RUN2.jsonl RUN3.jsonl
    python benchmarks/merge_runs.py OUT.jsonl before=B1.jsonl after=A1.jsonl before=B2.jsonl after=A2.jsonl

The rows of the k-th input get ``"run": k``. An input written ``LABEL=PATH`` also gives its rows
``"variant": LABEL``, and runs are then counted per label (an A/B measurement that alternates two versions of the
code: ``before`` runs 1, 2 and ``after`` runs 1, 2). Rows are otherwise copied unchanged, their ``provenance``
included; a row without one (written before provenance was recorded) stays without. ``benchmarks/tables.py``
reports the median over runs where a table says so.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from stablenet.atomic import atomic_write_text


def merged_rows(inputs: list[str]) -> list[dict]:
    """The rows of ``inputs`` (``PATH`` or ``LABEL=PATH``) in order, with ``run`` (and ``variant``) set."""
    runs: Counter[str | None] = Counter()
    rows = []
    for spec in inputs:
        label, _, path = spec.rpartition("=") if "=" in spec else (None, "", spec)
        runs[label] += 1
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if "run" in row or "variant" in row:
                raise ValueError(f"{path} already has run or variant fields; merge the original run files")
            row["run"] = runs[label]
            if label is not None:
                row["variant"] = label
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the merged JSON Lines file")
    parser.add_argument("inputs", nargs="+", help="run files in order, each PATH or LABEL=PATH")
    args = parser.parse_args()
    rows = merged_rows(args.inputs)
    atomic_write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} rows from {len(args.inputs)} runs: {args.out}")


if __name__ == "__main__":
    main()
