"""Whole-ResNet-18 certified zero-padding bound: time per method, methods interleaved in one run.

    python benchmarks/resnet18_bound.py --device cpu --methods svd,cholesky --repeats 3 \
        --json benchmarks/results/cpu/resnet18_cpu.json
    python benchmarks/resnet18_bound.py --profile cholesky   # where the time goes
    python benchmarks/resnet18_bound.py --methods embed --memory --budget none   # peak memory, checked rounds

Each repeat runs every method once (in the given order) after one warm-up of each, so a noisy machine slows
them alike; the JSON holds every run, the median per method, and the ratio of medians to the first method.
``--memory`` adds, per method, one untimed run on a CPU that measures the peak bytes held by the allocator (the
timed CUDA runs record theirs), and the number of lockstep rounds that read checks back to the host. The JSON
carries a ``provenance`` record (``stablenet.bench.provenance``).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import stablenet.spectral.lockstep as lockstep
from stablenet.atomic import atomic_write_text
from stablenet.bench.provenance import provenance
from stablenet.bench.spectral import cpu_peak_bytes, resnet18_bound_time, resnet18_kernels


def checked_rounds(run) -> tuple[object, int]:
    """``(run(), rounds)``: the lockstep rounds that read checks back to the host (0 without the lockstep)."""
    finished = []
    original = lockstep._gram_max_many

    def recording(*args, **kwargs):
        problems = original(*args, **kwargs)
        finished.extend(problems)
        return problems

    lockstep._gram_max_many = recording
    try:
        result = run()
    finally:
        lockstep._gram_max_many = original
    first = lockstep.FIRST_CHECK
    rounds = set()
    for p in finished:
        start = getattr(p, "start", 0)  # 0 before the lockstep had a memory budget
        rounds.update(range(start + min(first, p.steps) - 1, start + p.steps))
    return result, len(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--methods", default="svd,cholesky", help="comma-separated methods of conv_spectral_norm_upper_bound"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the runs here")
    parser.add_argument("--profile", default=None, help="instead, profile one run of this method (top operators)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory and checked rounds")
    parser.add_argument("--budget", default=None, help="the lockstep's max_memory_bytes (a number or 'none')")
    args = parser.parse_args()
    budget = {}
    if args.budget is not None:
        try:
            budget["max_memory_bytes"] = None if args.budget == "none" else int(float(args.budget))
        except ValueError:
            parser.error(f"--budget takes a number of bytes (e.g. 1.5e9) or 'none'; got {args.budget!r}")
    if args.profile:
        print("provenance:", json.dumps(provenance(device=args.device)))
        resnet18_bound_time(args.device, args.profile, **budget)  # warm-up
        kernels = resnet18_kernels(args.device)  # drawn outside the profile
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.device(args.device).type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run = resnet18_bound_time(args.device, args.profile, kernels=kernels, **budget)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"{args.profile}: {run['total_ms'] / 1e3:.2f} s; share of self CPU time by operator:")
        for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"  {event.key:32s} {100 * event.self_cpu_time_total / total:5.1f}%")
        if len(activities) > 1:
            busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            print(f"device busy {busy:.1f} ms of {run['total_ms']:.1f} ms wall (kernels by self device time):")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
        return
    methods = args.methods.split(",")
    for method in methods:
        resnet18_bound_time(args.device, method, **budget)  # warm-up
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        for method in methods:
            run = resnet18_bound_time(args.device, method, **budget)
            runs[method].append(run)
            print(f"repeat {repeat}  {method:10s} {run['total_ms'] / 1e3:7.2f} s", flush=True)
    medians = {m: statistics.median(r["total_ms"] for r in runs[m]) for m in methods}
    base = methods[0]
    largest_gap = max(
        abs(a / b - 1) for m in methods for a, b in zip(runs[m][0]["values"], runs[base][0]["values"], strict=True)
    )
    for method in methods:
        print(f"{method:10s} median {medians[method] / 1e3:.2f} s  ({medians[base] / medians[method]:.2f}x {base})")
    print(f"largest relative difference of a layer's bound between methods: {largest_gap:.2e}")
    memory = {}
    for method in methods if args.memory else ():
        run, rounds = checked_rounds(lambda m=method: resnet18_bound_time(args.device, m, **budget))
        if torch.device(args.device).type == "cpu":
            _, peak = cpu_peak_bytes(lambda m=method: resnet18_bound_time(args.device, m, **budget))
            run["peak_mem_mb"] = peak / 2**20
        memory[method] = {"peak_mem_mb": run.get("peak_mem_mb"), "checked_rounds": rounds}
        print(f"{method:10s} peak memory {run.get('peak_mem_mb') or 0:.0f} MiB, {rounds} checked lockstep rounds")
    if args.json:
        summary = {
            "provenance": provenance(device=args.device),
            "threads": torch.get_num_threads(),
            "median_ms": medians,
            "speedup_vs_" + base: {m: medians[base] / medians[m] for m in methods},
            "max_memory_bytes": budget.get("max_memory_bytes", getattr(lockstep, "LOCKSTEP_MEMORY_BYTES", None)),
            "memory": memory,
            "runs": runs,
        }
        atomic_write_text(args.json, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
