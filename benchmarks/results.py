"""Issue 19's result tables: train a recipe, certify it, write its table row as JSON with provenance.

    python benchmarks/results.py ROW [--data-root DIR] [--device cpu] [--out DIR] [--time-budget MIN]
        [--set KEY=VALUE ...] [--fast]

ROW is a key of ``ROWS`` (one recipe in ``configs/`` and how it is certified). The run trains into
``runs/results/ROW`` (``--resume`` after a kill: the trainer resumes exactly), certifies into record files beside it
(a killed certification resumes too), and writes ``OUT/ROW.json`` (default ``benchmarks/results/<machine>/results``)
atomically: the certified accuracy at the data set's standard radii (smoothing rows: the published tables' 0.5 / 1 /
1.5 / 2) per method, the clean accuracy, the epochs, the training and certification wall times, the recipe and the
provenance (commit, versions, machine, command).

Smoothing rows train the base model with Gaussian noise at σ (the recipe's ``noise_sigma``) and certify Cohen,
LVM-RS and CPM on the same first ``examples`` test images with the published protocol (n0 = 100, n = 100 000,
α = 0.001), so that the Lipschitz-aware methods are compared with Cohen on the same model and images.

``--fast`` runs the same code on scikit-learn's digits with a tiny network, two epochs and small Monte-Carlo
counts (seconds; used by the tests): its rows are marked ``fast`` and say nothing about the recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from stablenet.atomic import atomic_write_json
from stablenet.bench.provenance import provenance
from stablenet.certify.records import read_records
from stablenet.data import STANDARD_RADII
from stablenet.train import train
from stablenet.train.checkpoint import TRAIN_STATE_FILE
from stablenet.train.config import apply_overrides, load_config
from stablenet.workflows.certification import certify_run
from stablenet.workflows.certifiers import SmoothingParams
from stablenet.workflows.report import certified_accuracy, format_radius

ROOT = Path(__file__).resolve().parent.parent
SMOOTHING = ("smoothing", "lvm-rs", "cpm")
#: The radii of the published MNIST smoothing tables (Cohen et al.'s protocol).
SMOOTHING_RADII = (0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Row:
    """One table row: a recipe and its certification."""

    table: str
    config: str
    methods: tuple[str, ...] = ("lipschitz",)
    examples: int | None = None  # test images certified (None: the whole test set)
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    note: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    radii: tuple[float, ...] | None = None  # None: the data set's standard radii


ROWS: dict[str, Row] = {
    "mnist-lipschitz": Row("mnist-lipschitz", "configs/mnist-lipschitz.yaml"),
    "mnist-lipschitz-10min": Row("mnist-lipschitz-10min", "configs/mnist-lipschitz-10min.yaml"),
    **{
        f"mnist-smoothing-s{tag}": Row(
            "mnist-smoothing", f"configs/mnist-smoothing-s{tag}.yaml", SMOOTHING, 500, radii=SMOOTHING_RADII
        )
        for tag in ("025", "050", "100")
    },
    "cifar10-lipschitz-30min-cpu": Row(
        "cifar10-lipschitz-30min-cpu", "configs/cifar10-lipschitz-30min-cpu.yaml", note="CIFAR-10 JPEG copy"
    ),
    "cifar10-sll-s": Row("cifar10-sll-s", "configs/cifar10-sll-s.yaml", note="CIFAR-10 JPEG copy"),
    "cifar10-10min-gpu": Row("cifar10-10min-gpu", "configs/cifar10-10min-gpu.yaml", note="CIFAR-10 JPEG copy"),
}

#: What ``--fast`` changes: digits, a tiny network, two epochs, no budget, small Monte-Carlo counts.
FAST = {
    "dataset": "digits",
    "data_root": None,
    "model": "sll_mlp",
    "model_args": {"width": 64, "depth": 2, "inner_width": 64},
    "epochs": 2,
    "warmup_epochs": 0.0,
    "time_budget": 0.0,
    "batch_size": 64,
    "crop_padding": 0,
    "flip": False,
    "eval_every": 1,
}


def run_row(
    name: str,
    *,
    data_root: str | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
    runs: str | Path = "runs/results",
    fast: bool = False,
    time_budget: float | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and certify row ``name``; write and return its JSON row (``time_budget``: minutes, replacing the
    recipe's; ``settings``: config keys replacing the recipe's, recorded in the row)."""
    if name not in ROWS:
        raise SystemExit(f"results.py: unknown row {name!r}; rows: {', '.join(ROWS)}")
    row = ROWS[name]
    config = load_config(ROOT / row.config)
    overrides: dict[str, Any] = {**row.overrides, "device": device, "out": str(Path(runs) / name)}
    if data_root is not None:
        overrides["data_root"] = data_root
    if fast:
        overrides |= {k: v for k, v in FAST.items() if k != "model_args"}
        overrides |= {f"model_args.{k}": v for k, v in FAST["model_args"].items()}
        config = dataclasses.replace(config, model_args={})  # the tiny network replaces the recipe's (noise kept)
    if time_budget is not None:
        overrides["time_budget"] = time_budget
    overrides |= settings or {}
    config = apply_overrides(config, overrides)
    run_dir = Path(config.out)
    started = provenance(device=device)  # the code that trains and certifies, not the checkout at the end
    t0 = time.perf_counter()
    result = train(config, resume=(run_dir / TRAIN_STATE_FILE).exists(), progress=progress)
    train_s = time.perf_counter() - t0
    last = result.metrics[-1]
    radii = row.radii or STANDARD_RADII[config.dataset]
    examples = row.examples if not fast else 40
    n0, n = (row.n0, row.n) if not fast else (32, 500)
    methods: dict[str, Any] = {}
    for method in row.methods:
        smoothing = None
        if method in SMOOTHING:
            smoothing = SmoothingParams(sigma=config.noise_sigma, n0=n0, n=n, alpha=row.alpha, seed=0)
        records_path = run_dir / f"certify_{method}.jsonl"
        reused = len(read_records(records_path)) if records_path.exists() else 0
        certify_run(
            run_dir,
            records_path,
            method=method,
            smoothing=smoothing,
            data_root=config.data_root,
            max_examples=examples,
            batch_size=10_000 if smoothing else 256,  # noisy copies per forward pass
            device=device,
            progress=progress,
        )
        records = read_records(records_path)
        accuracy = certified_accuracy(records, (0.0, *radii))
        methods[method] = {
            "clean": float(accuracy[0]),
            "certified": {format_radius(r): float(a) for r, a in zip(radii, accuracy[1:], strict=True)},
            "examples": len(records),
            # the records' own times: a resumed run counts the work of every session that wrote its records
            "certify_s": sum(r.time_s for r in records),
            "records_reused": reused,
            **({"n0": n0, "n": n, "alpha": row.alpha, "sigma": config.noise_sigma} if smoothing else {}),
        }
    record = {
        "row": name,
        "table": row.table,
        "fast": fast,
        "recipe": row.config,
        "dataset": config.dataset,
        "note": row.note,
        "model": config.model,
        "model_args": config.model_args,
        "epochs": len(result.metrics),
        "time_budget_min": config.time_budget,
        "changed": {"time_budget": time_budget, **(settings or {})} if time_budget is not None or settings else {},
        "train_wall_s": last.get("wall_time_s", train_s),
        "test_acc": last.get("test_acc"),
        "methods": methods,
        "provenance": started,
    }
    machine = "cpu" if torch.device(device).type == "cpu" else "gpu"
    out_dir = Path(out) if out is not None else ROOT / "benchmarks" / "results" / machine / "results"
    atomic_write_json(out_dir / f"{name}{'-fast' if fast else ''}.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", choices=list(ROWS))
    parser.add_argument("--data-root", default=None, help="directory holding the data set files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="directory of the row's JSON (default benchmarks/results/...)")
    parser.add_argument("--runs", default="runs/results", help="directory of the training runs")
    parser.add_argument("--fast", action="store_true", help="digits, tiny network, two epochs: a smoke test")
    parser.add_argument("--time-budget", type=float, default=None, help="minutes, replacing the recipe's budget")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="replace a recipe key (YAML value)"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    settings = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--set takes KEY=VALUE; got {item!r}")
        settings[key] = yaml.safe_load(value)
    record = run_row(
        args.row,
        data_root=args.data_root,
        device=args.device,
        out=args.out,
        runs=args.runs,
        fast=args.fast,
        time_budget=args.time_budget,
        settings=settings,
        progress=not args.quiet,
    )
    for method, values in record["methods"].items():
        cells = ", ".join(f"{r}: {100 * a:.1f}%" for r, a in values["certified"].items())
        print(f"{record['row']} {method}: clean {100 * values['clean']:.1f}%, certified {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
