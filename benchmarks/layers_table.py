"""Markdown table of `stablenet bench layers` JSON rows: train / eval time ratios to the plain twin per layer.

Usage: python benchmarks/layers_table.py ROWS.jsonl[,RUN2.jsonl,...] [MORE.jsonl ...]
One column group per argument; comma-separated files are repeated runs, and their median ratio is shown.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _load_one(path: str) -> dict[tuple[str, str], dict[str, dict]]:
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        shape = "x".join(map(str, r["shape"]))
        rows.setdefault((r["layer"], shape if r["layer"] in ("sll_s", "orthogonal") else str(r["shape"][1])), {})[
            r["mode"]
        ] = r
    return rows


def load(paths: str) -> dict[tuple[str, str], dict[str, dict]]:
    """Rows of one or more runs (comma-separated); numeric fields become medians over the runs."""
    runs = [_load_one(p) for p in paths.split(",")]
    merged = runs[0]
    for key, modes in merged.items():
        for mode, row in modes.items():
            for field in ("ratio_to_plain", "images_per_s", "plain_images_per_s"):
                if field in row:
                    row[field] = statistics.median(run[key][mode][field] for run in runs)
    return merged


def _label(paths: str) -> str:
    first = Path(paths.split(",")[0]).parent.name
    n = len(paths.split(","))
    return f"{first}, median of {n}" if n > 1 else first


def main(paths: list[str]) -> None:
    tables = [load(p) for p in paths]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    head = "| layer | width / shape |" + "".join(
        f" train ×plain ({_label(p)}) | eval ×plain ({_label(p)}) |" for p in paths
    )
    print(head)
    print("|---|---|" + "---:|---:|" * len(paths))
    for layer, shape in keys:
        cells = []
        for t in tables:
            modes = t.get((layer, shape), {})
            cells += [f"{modes[m]['ratio_to_plain']:.2f}" if m in modes else "-" for m in ("train", "eval")]
        print(f"| {layer} | {shape} | " + " | ".join(cells) + " |")
    for p, t in zip(paths, tables, strict=True):
        for (layer, _), modes in t.items():
            if "train_bf16" in modes:
                r = modes["train_bf16"]
                print(
                    f"\n{layer} bf16 training ({_label(p)}, batch {r['shape'][0]}): "
                    f"{r['images_per_s']:.0f} images/s vs {r['plain_images_per_s']:.0f} for the plain twin "
                    f"({r['images_per_s'] / r['plain_images_per_s']:.2f}×)"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
