"""Markdown table of `stablenet bench layers` JSON rows: train / eval time ratios to the plain twin per layer.

Usage: python benchmarks/layers_table.py ROWS.jsonl[,RUN2.jsonl,...] [MORE.jsonl ...]
One column group per argument; comma-separated files are repeated runs, and their median ratio is shown. Runs with
``train_graphs`` rows (CUDA graphs for the weight maps, on a GPU) get a third column.
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
    columns = []  # (table, mode, title)
    for p, t in zip(paths, tables, strict=True):
        graphs = any("train_graphs" in modes for modes in t.values())
        modes = ("train", "train_graphs", "eval") if graphs else ("train", "eval")
        titles = {"train": "train", "train_graphs": "train, CUDA graphs", "eval": "eval"}
        columns += [(t, m, f"{titles[m]} ×plain ({_label(p)})") for m in modes]
    print("| layer | width / shape |" + "".join(f" {title} |" for *_, title in columns))
    print("|---|---|" + "---:|" * len(columns))
    for layer, shape in keys:
        cells = []
        for t, mode, _ in columns:
            modes = t.get((layer, shape), {})
            cells.append(f"{modes[mode]['ratio_to_plain']:.2f}" if mode in modes else "-")
        print(f"| {layer} | {shape} | " + " | ".join(cells) + " |")
    for p, t in zip(paths, tables, strict=True):
        for (layer, _), modes in t.items():
            for mode in ("train_bf16", "train_bf16_graphs"):
                if mode in modes:
                    r = modes[mode]
                    how = " with CUDA-graphed weight maps" if mode.endswith("graphs") else ""
                    print(
                        f"\n{layer} bf16 training{how} ({_label(p)}, batch {r['shape'][0]}): "
                        f"{r['images_per_s']:.0f} images/s vs {r['plain_images_per_s']:.0f} for the plain twin "
                        f"({r['images_per_s'] / r['plain_images_per_s']:.2f}×)"
                    )


if __name__ == "__main__":
    main(sys.argv[1:])
