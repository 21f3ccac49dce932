"""Lipschitz certification of trained runs: certified accuracy and time, per certified arithmetic.

    python benchmarks/certify_arithmetic.py --run runs/demo/train --repeats 7 \
        --json benchmarks/results/cpu/certify/arithmetic_demo.json
    python benchmarks/certify_arithmetic.py --run runs/mnist_curvature_base --data-root ../shared/data/mnist

For each arithmetic the certifier offers (``float64`` and ``native``; Note [certified arithmetic] in
``stablenet.certify.lipschitz``) it builds ``LipschitzCertifier`` on the run's model and certifies the whole test
split in batches of 256, ``--repeats`` times, arithmetics interleaved so a noisy machine slows them alike. It
reports the median wall time of building the certifier and of certifying, clean and certified accuracy at the
data set's standard radii, and the mean radius; and the median wall time of the whole certification stage,
``certify_run`` (loading the model and the data, the certifier, writing the records), into a temporary file.
The same script runs against an older checkout of the package (``PYTHONPATH=OLD/src``), whose certifier has no
``arithmetic`` option: its one row is labelled ``legacy``. The JSON carries a ``provenance`` record
(``stablenet.bench.provenance``; for an older checkout, this checkout's module names the older one's commit).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import stablenet
from stablenet.certify.lipschitz import LipschitzCertifier
from stablenet.train.checkpoint import read_model_metadata

try:
    from stablenet.atomic import atomic_write_text
    from stablenet.data.radii import STANDARD_RADII
    from stablenet.workflows.certification import certify_run
except ImportError:  # a checkout from before the workflows package
    from stablenet.certify.report import STANDARD_RADII
    from stablenet.certify.run import certify_run
    from stablenet.io import atomic_write_text
try:
    from stablenet.bench.provenance import provenance
except ImportError:  # a checkout from before provenance: this checkout's module, loaded by its path
    _spec = importlib.util.spec_from_file_location(
        "_provenance", Path(__file__).resolve().parents[1] / "src" / "stablenet" / "bench" / "provenance.py"
    )
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    provenance = _module.provenance


def arithmetics() -> list[str]:
    if "arithmetic" in inspect.signature(LipschitzCertifier).parameters:
        return ["float64", "native"]
    return ["legacy"]


def certify_once(model, images, labels, arithmetic: str, batch_size: int) -> dict:
    kwargs = {} if arithmetic == "legacy" else {"arithmetic": arithmetic}
    t0 = time.perf_counter()
    certifier = LipschitzCertifier(model, "auto", tuple(images.shape[1:]), **kwargs)
    t1 = time.perf_counter()
    preds, radii = [], []
    for start in range(0, len(images), batch_size):
        pred, radius = certifier(images[start : start + batch_size])
        preds.append(pred)
        radii.append(radius)
    t2 = time.perf_counter()
    pred, radius = torch.cat(preds), torch.cat(radii)
    return {"init_s": t1 - t0, "certify_s": t2 - t1, "pred": pred, "radius": radius}


def certify_run_once(run: str, data_root: str | None, arithmetic: str) -> float:
    kwargs = {} if arithmetic == "legacy" else {"arithmetic": arithmetic}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        certify_run(run, Path(tmp) / "records.jsonl", data_root=data_root, progress=False, **kwargs)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory (model.safetensors, model.json)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    dataset = read_model_metadata(args.run)["dataset"]
    model = stablenet.load_model(args.run).eval()
    images, labels = stablenet.load_dataset(dataset, "test", args.data_root)
    radii = STANDARD_RADII.get(dataset, (0.5, 1.0))
    runs: dict[str, list[dict]] = {a: [] for a in arithmetics()}
    stage: dict[str, list[float]] = {a: [] for a in runs}
    for arithmetic in runs:  # warm-up: the first run of a process loads and caches the data set
        certify_run_once(args.run, args.data_root, arithmetic)
    for _ in range(args.repeats):
        for arithmetic in runs:
            with torch.no_grad():
                runs[arithmetic].append(certify_once(model, images, labels, arithmetic, args.batch_size))
            stage[arithmetic].append(certify_run_once(args.run, args.data_root, arithmetic))
    rows = []
    for arithmetic, results in runs.items():
        last = results[-1]
        correct = last["pred"] == labels
        row = {
            "arithmetic": arithmetic,
            "init_s": statistics.median(r["init_s"] for r in results),
            "certify_s": statistics.median(r["certify_s"] for r in results),
            "certify_run_s": statistics.median(stage[arithmetic]),
            "clean": float(correct.double().mean()),
            "certified": {str(r): float((correct & (last["radius"] >= r)).double().mean()) for r in radii},
            "mean_radius": float(last["radius"].mean()),
        }
        rows.append(row)
        cert = " / ".join(f"{100 * v:.2f}" for v in row["certified"].values())
        print(
            f"{arithmetic:8s} init {row['init_s']:.3f} s  certify {row['certify_s']:.3f} s  "
            f"certify_run {row['certify_run_s']:.3f} s  "
            f"clean {100 * row['clean']:.2f}  certified at {'/'.join(map(str, radii))}: {cert}  "
            f"mean radius {row['mean_radius']:.5f}"
        )
    out = {
        "provenance": provenance(device="cpu"),
        "run": args.run,
        "dataset": dataset,
        "examples": len(images),
        "repeats": args.repeats,
        "rows": rows,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
