"""The tables of benchmarks/README.md, generated from the result files under benchmarks/results/.

    python benchmarks/tables.py           # rewrite every table of the README in place
    python benchmarks/tables.py --check   # exit 1, naming the first table that differs from what the files give

A table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``, NAME a key of ``TABLES``. Each starts with
its sources: per file, the machine, command, date, commit and versions from the rows' ``provenance``
(``stablenet.bench.provenance``). What a file written before provenance was recorded lacks reads "not recorded";
its date is then that of the commit that last wrote the file (``WRITTEN``, from ``git log``), said so in the
table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
TABLES: dict[str, Callable[[], str]] = {}
NOT_RECORDED = "not recorded"

#: For files written before provenance was recorded: the commit that last wrote the file (or the run files merged
#: into it) and its date, from ``git log -1 --format='%h %ad' --date=short -- PATH``.
WRITTEN = {
    "cpu/bench_curvature_cpu.jsonl": ("2bc905b", "2026-11-26"),
    "cpu/bench_curvature_cpu_mnist.jsonl": ("2bc905b", "2026-11-26"),
    "cpu/bench_layers.jsonl": ("ca7a26b", "2026-11-26"),
    "cpu/bench_layers_cpl_gram.jsonl": ("2875db0", "2026-11-26"),
    "cpu/bench_layers_session13.jsonl": ("3e09863", "2026-11-26"),
    "cpu/bench_layers_spectral_gram.jsonl": ("9bc9474", "2026-11-26"),
    "cpu/bench_smoothing_cpu_quick.jsonl": ("712e9bf", "2026-11-26"),
    "cpu/bench_spectral_cpu_quick.jsonl": ("712e9bf", "2026-11-26"),
    "cpu/certify/arithmetic_demo.json": ("ee8a8c2", "2026-12-07"),
    "cpu/certify/arithmetic_mnist_sll_mlp.json": ("ee8a8c2", "2026-12-07"),
    "cpu/curvature/table.md": ("ee8a8c2", "2026-12-07"),
    "cpu/resnet18_cpu.json": ("f5959d4", "2026-11-26"),
    "cpu/resnet18_lockstep_after.json": ("956216a", "2026-11-26"),
    "cpu/resnet18_lockstep_no_budget.json": ("956216a", "2026-11-26"),
    "cpu/resnet18_spatial_gram_memory.json": ("956216a", "2026-11-26"),
    "h100/bench_layers_graphs.jsonl": ("c3122ff", "2026-11-26"),
    "h200/bench_layers_graphs.jsonl": ("c3122ff", "2026-11-26"),
    "h200/bench_smoothing_chunked.jsonl": ("cba002e", "2026-11-26"),
    "h200/bench_smoothing_unchunked.jsonl": ("cba002e", "2026-11-26"),
    "h200/bench_spectral_cuda.jsonl": ("a33514c", "2026-11-26"),
    "h200/bench_spectral_cuda_lockstep.jsonl": ("cba002e", "2026-11-26"),
    "h200/curvature_lipconvnet/table.md": ("70f661a", "2026-11-26"),
    "h200/resnet18_cuda_lockstep.json": ("cba002e", "2026-11-26"),
    "h200/resnet18_cuda_sparse.json": ("92862e5", "2026-11-26"),
    "h200/smoothing/mnist_smoothing_sigma025.jsonl": ("cb45f2b", "2026-11-26"),
    "h200/smoothing/mnist_smoothing_sigma050.jsonl": ("cb45f2b", "2026-11-26"),
    "h200/smoothing/mnist_smoothing_sigma100.jsonl": ("cb45f2b", "2026-11-26"),
}


def table(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(build: Callable[[], str]) -> Callable[[], str]:
        TABLES[name] = build
        return build

    return register


# Reading files and their provenance.


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / path).read_text().splitlines() if line.strip()]


def document(path: str) -> dict:
    return json.loads((RESULTS / path).read_text())


def _records(path: str) -> list[dict]:
    """The provenance records of a file; for a file without, what it recorded of the same (often nothing)."""
    if path.endswith(".jsonl"):
        found = [row["provenance"] for row in rows(path) if "provenance" in row]
        return found or [{}]
    if path.endswith(".json"):
        doc = document(path)
        if "provenance" in doc:
            return [doc["provenance"]]
        machine = doc.get("machine") and f"{doc['machine']}, {doc.get('threads', '?')} threads"  # before provenance
        return [{"commit": doc.get("commit"), "torch": doc.get("torch"), "command": doc.get("command"),
                 "device": machine or None}]  # fmt: skip
    return [{}]


def _values(records: list[dict], key: str) -> list:
    return list(dict.fromkeys(r[key] for r in records if r.get(key) is not None))


def describe(path: str) -> str:
    """One line: the file and its machine, command, date, commit and versions."""
    records = _records(path)

    def field(key: str, show: Callable[[object], str] = str) -> str:
        values = _values(records, key)
        return ", ".join(show(v) for v in values) if values else NOT_RECORDED

    dates = sorted(d[:10] for d in _values(records, "date"))
    if dates:
        date = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    elif path in WRITTEN:
        date = f"{NOT_RECORDED} (the file was committed in {WRITTEN[path][0]} on {WRITTEN[path][1]}, `git log`)"
    else:
        date = NOT_RECORDED
    commits = [
        c[:7] + (" with uncommitted changes" if r.get("dirty") else "") for r in records if (c := r.get("commit"))
    ]
    commit = ", ".join(dict.fromkeys(commits)) or NOT_RECORDED
    cuda = _values(records, "cuda")
    return (
        f"- `{path}`: machine {field('device')}; command {field('command', lambda c: f'`{c}`')}; date {date}; "
        f"commit {commit}; torch {field('torch')}" + (f" (CUDA {', '.join(cuda)})" if cuda else "")
    )


def sources(*paths: str) -> str:
    return "Sources (under `benchmarks/results/`):\n" + "\n".join(describe(p) for p in paths) + "\n"


# Formatting.


def markdown(header: Iterable[str], body: Iterable[Iterable[object]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: the first left, the rest
    right)."""
    header = list(header)
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def ms(value: float) -> str:
    if value < 0.1:
        return f"{value * 1e3:.1f} µs"
    if value >= 1000:
        return f"{value / 1e3:.2f} s"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def ratio(value: float) -> str:
    return f"{value:.7f}" if value < 10 else f"{value:.5f}"


def median(values: Iterable[float]) -> float:
    """The median over runs (the mean of the middle two for an even count)."""
    return statistics.median(list(values))


def upper_median(values: Iterable[float]) -> float:
    """The median over layers, a measured value: the upper of the middle two for an even count."""
    return statistics.median_high(list(values))


# Spectral engine.


def _method_summary(path: str, methods: Iterable[str] | None = None) -> str:
    by_method: dict[str, list[dict]] = {}
    for row in rows(path):
        by_method.setdefault(row["method"], []).append(row)
    chosen = [m for m in by_method if methods is None or m in methods]
    body = [
        (
            f"`{m}`",
            "exact" if by_method[m][0]["reference_kind"] == "exact" else "power-200 (a lower estimate)",
            len(by_method[m]),
            ratio(min(r["ratio"] for r in by_method[m])),
            ratio(max(r["ratio"] for r in by_method[m])),
            ms(upper_median(r["time_ms"] for r in by_method[m])),
            ms(max(r["time_ms"] for r in by_method[m])),
        )
        for m in chosen
    ]
    header = ("method", "ratio against", "layers", "min ratio", "max ratio", "median time", "max time")
    return markdown(header, body, "llrrrrr")


@table("spectral-cpu")
def spectral_cpu() -> str:
    path = "cpu/bench_spectral_cpu_quick.jsonl"
    return sources(path) + "\n" + _method_summary(path)


@table("spectral-h200")
def spectral_h200() -> str:
    path = "h200/bench_spectral_cuda_lockstep.jsonl"
    return sources(path) + "\n" + _method_summary(path)


@table("spectral-h200-not-rerun")
def spectral_h200_not_rerun() -> str:
    path, later = "h200/bench_spectral_cuda.jsonl", "h200/bench_spectral_cuda_lockstep.jsonl"
    rerun = {row["method"] for row in rows(later)}
    return sources(path) + "\n" + _method_summary(path, [r["method"] for r in rows(path) if r["method"] not in rerun])


@table("spectral-h200-layers")
def spectral_h200_layers() -> str:
    path = "h200/bench_spectral_cuda_lockstep.jsonl"
    cells: dict[str, dict[str, dict]] = {}
    for row in rows(path):
        cells.setdefault(row["layer"], {})[row["method"]] = row
    body = []
    for layer, by_method in cells.items():
        first = next(iter(by_method.values()))
        c_out, c_in, kh, kw = first["shape"]
        exact = by_method["circular_gram_certified"]["reference"]
        body.append(
            (
                layer,
                f"{c_out}×{c_in}×{kh}×{kw} @ {first['input_size']}",
                f"{exact:.4f}",
                *(
                    f"{by_method[m]['ratio']:.6f} / {ms(by_method[m]['time_ms'])}"
                    for m in ("circular_gram_certified", "zeros_embed_certified", "zeros_spatial_gram")
                ),
                ms(by_method["circular_cholesky_certified"]["time_ms"]),
            )
        )
    header = (
        "layer",
        "shape @ n",
        "circular norm (exact)",
        "circular Gram, certified: ratio / time",
        "zero padding, embedding, certified: ratio / time",
        "zero padding, spatial Gram: ratio / time",
        "circular Cholesky, certified: time",
    )
    return sources(path) + "\n" + markdown(header, body, "llrrrrr")


RESNET18 = (  # (file, methods): the current figure of each method on each machine
    ("cpu/resnet18_lockstep_after.json", ("embed", "cholesky")),
    ("cpu/resnet18_lockstep_no_budget.json", ("embed",)),
    ("cpu/resnet18_spatial_gram_memory.json", ("gram",)),
    ("cpu/resnet18_cpu.json", ("svd", "cholesky")),
    ("h200/resnet18_cuda_sparse.json", ("embed", "gram")),
    ("h200/resnet18_cuda_lockstep.json", ("cholesky",)),
)


@table("resnet18")
def resnet18() -> str:
    body = []
    for path, methods in RESNET18:
        doc = document(path)
        if "max_memory_bytes" not in doc:
            budget = NOT_RECORDED
        else:
            budget = "none" if doc["max_memory_bytes"] is None else f"{doc['max_memory_bytes'] / 2**30:.2f} GiB"
        for method in methods:
            runs = doc["runs"][method]
            memory = doc.get("memory", {}).get(method, {})
            peak = memory.get("peak_mem_mb") or max((r.get("peak_mem_mb") or 0) for r in runs) or None
            rounds = memory.get("checked_rounds")
            body.append(
                (
                    path.split("/")[0],
                    f"`{method}`",
                    budget,
                    ms(doc["median_ms"][method]),
                    len(runs),
                    f"{peak:.0f} MiB" if peak else NOT_RECORDED,
                    NOT_RECORDED if rounds is None else rounds,
                    f"`{path}`",
                )
            )
    header = (
        "machine",
        "method",
        "memory budget",
        "median time",
        "repeats",
        "peak memory",
        "rounds with a host read",
        "file",
    )
    return sources(*(p for p, _ in RESNET18)) + "\n" + markdown(header, body, "lllrrrrl")


# Certified arithmetic.


@table("certify-arithmetic")
def certify_arithmetic() -> str:
    paths = ("cpu/certify/arithmetic_demo.json", "cpu/certify/arithmetic_mnist_sll_mlp.json")
    body = []
    for path in paths:
        doc = document(path)
        for row in doc["rows"]:
            radii = " / ".join(row["certified"])
            body.append(
                (
                    f"`{doc['run']}` ({doc['dataset']}, {doc['examples']} test images)",
                    row["arithmetic"],
                    f"{100 * row['clean']:.2f}",
                    radii + ": " + " / ".join(f"{100 * v:.2f}" for v in row["certified"].values()),
                    f"{row['mean_radius']:.5f}",
                    f"{row['init_s']:.3f} + {row['certify_s']:.3f}",
                    f"{row['certify_run_s']:.3f}",
                    doc["repeats"],
                )
            )
    header = (
        "run",
        "arithmetic",
        "clean (%)",
        "certified (%) at radii",
        "mean radius",
        "build + certify (s)",
        "`certify_run` (s)",
        "repeats",
    )
    return sources(*paths) + "\n" + markdown(header, body, "llrrrrrr")


# Randomized smoothing.


@table("smoothing-h200")
def smoothing_h200() -> str:
    paths = {"h200/bench_smoothing_chunked.jsonl": "on", "h200/bench_smoothing_unchunked.jsonl": "off"}
    body = [
        (
            row["model"],
            chunks,
            row["n"],
            row["batch_size"],
            f"{row['samples_per_s']:.4g}",
            f"{row['plain_samples_per_s']:.4g}",
            f"{row['ratio']:.3f}",
            f"{row['noise_bound']:.3f}",
            ms(1e3 / row["images_per_s"]),
        )
        for path, chunks in paths.items()
        for row in rows(path)
    ]
    header = (
        "model",
        "noise chunks",
        "n",
        "batch",
        "samples/s",
        "plain samples/s",
        "ratio",
        "noise bound",
        "per image",
    )
    return sources(*paths) + "\n" + markdown(header, body, "llrrrrrrr")


@table("smoothing-cpu")
def smoothing_cpu() -> str:
    path = "cpu/bench_smoothing_cpu_quick.jsonl"
    by_model: dict[str, list[dict]] = {}
    for row in rows(path):
        by_model.setdefault(row["model"], []).append(row)
    body = [
        (
            model,
            runs[0]["n"],
            runs[0]["batch_size"],
            ", ".join(f"{r['ratio']:.3f}" for r in sorted(runs, key=lambda r: r["run"])),
            f"{median(r['ratio'] for r in runs):.3f}",
            f"{median(r['noise_bound'] for r in runs):.3f}",
        )
        for model, runs in by_model.items()
    ]
    header = ("model", "n", "batch", "ratio, runs 1 to 5", "median ratio", "median noise bound")
    return sources(path) + "\n" + markdown(header, body)


@table("smoothing-mnist-h200")
def smoothing_mnist_h200() -> str:
    paths = [f"h200/smoothing/mnist_smoothing_sigma{tag}.jsonl" for tag in ("025", "050", "100")]
    radii = (0.5, 1.0, 1.5, 2.0)
    body = []
    for path in paths:
        meta = document(path[: -len(".jsonl")] + ".jsonl.meta.json")
        records = rows(path)
        certified = [sum(r["correct"] and r["radius"] >= eps for r in records) / len(records) for eps in radii]
        body.append(
            (
                f"{meta['sigma']:.2f}",
                len(records),
                f"{meta['n0']} / {meta['n']} / {meta['alpha']}",
                f"{100 * sum(r['correct'] for r in records) / len(records):.1f}",
                *(f"{100 * c:.1f}" for c in certified),
                ms(1e3 * statistics.fmean(r["time_s"] for r in records)),
            )
        )
    header = ("σ", "test images", "n0 / n / α", "clean (%)", *(f"certified (%) at {eps}" for eps in radii), "per image")
    return sources(*paths) + "\n" + markdown(header, body)


# Curvature.


@table("curvature-cpu")
def curvature_cpu() -> str:
    paths = ("cpu/bench_curvature_cpu.jsonl", "cpu/bench_curvature_cpu_mnist.jsonl")
    body = []
    for path in paths:
        for row in rows(path):
            how = row.get("backend") or f"{row.get('method')}, {row.get('start')} start"
            if row["benchmark"] == "landscape_2d":
                how = f"{row['resolution']}×{row['resolution']} on {row['num_examples']} images"
            target = row.get("target", row.get("target_s"))
            body.append(
                (
                    row["data"],
                    f"`{row['model']}`",
                    row["benchmark"],
                    how,
                    row.get("num_hvp", "-"),
                    f"{row['ratio_or_gradient_equivalents']:.2f}",
                    f"{row['relative_error']:.1e}" if "relative_error" in row else "-",
                    ms(row["time_ms"]),
                    "-" if target is None else f"{target:g}" + (" s" if "target_s" in row else ""),
                    {True: "yes", False: "no"}.get(row.get("meets_target"), "-"),
                )
            )
    header = (
        "data",
        "model",
        "benchmark",
        "how",
        "products",
        "ratio or gradient-equivalents",
        "relative error",
        "time",
        "target",
        "met",
    )
    return sources(*paths) + "\n" + markdown(header, body, "llllrrrrrl")


def _experiment(path: str) -> str:
    return sources(path) + "\n" + (RESULTS / path).read_text()


@table("curvature-experiment-cpu")
def curvature_experiment_cpu() -> str:
    return _experiment("cpu/curvature/table.md")


@table("curvature-experiment-h200")
def curvature_experiment_h200() -> str:
    return _experiment("h200/curvature_lipconvnet/table.md")


# Layer zoo.


def _layer_ratios(path: str, field: str = "ratio_to_plain") -> dict[tuple[str, str], dict[str, list[float]]]:
    """``(layer, width or shape) -> mode -> [value per run]``."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows(path):
        if field not in row:
            continue
        shape = row["shape"]
        size = "x".join(map(str, shape)) if row["layer"] in ("sll_s", "orthogonal") else str(shape[1])
        out.setdefault((row["layer"], size), {}).setdefault(row["mode"], []).append(row[field])
    return out


def _cell(values: list[float] | None) -> str:
    return "-" if not values else f"{median(values):.2f}"


@table("layers-gpu")
def layers_gpu() -> str:
    machines = {"H200": "h200/bench_layers_graphs.jsonl", "H100": "h100/bench_layers_graphs.jsonl"}
    tables = {m: _layer_ratios(p) for m, p in machines.items()}
    keys = list(dict.fromkeys(k for t in tables.values() for k in t))
    modes = {"train": "train", "train_graphs": "train, CUDA graphs", "eval": "eval"}
    body = [
        (layer, size, *(_cell(tables[m].get((layer, size), {}).get(mode)) for m in machines for mode in modes))
        for layer, size in keys
        if any(mode in tables[m].get((layer, size), {}) for m in machines for mode in modes)
    ]
    header = ("layer", "width / shape", *(f"{title} ×plain ({m})" for m in machines for title in modes.values()))
    return sources(*machines.values()) + "\n" + markdown(header, body, "llrrrrrr")


@table("layers-gpu-bf16")
def layers_gpu_bf16() -> str:
    machines = {"H200": "h200/bench_layers_graphs.jsonl", "H100": "h100/bench_layers_graphs.jsonl"}
    body = []
    for machine, path in machines.items():
        speed = _layer_ratios(path, "images_per_s")
        plain = _layer_ratios(path, "plain_images_per_s")
        for (layer, size), by_mode in speed.items():
            for mode, how in (("train_bf16", "eager"), ("train_bf16_graphs", "CUDA-graphed weight maps")):
                if mode in by_mode:
                    ours, theirs = median(by_mode[mode]), median(plain[(layer, size)][mode])
                    body.append((machine, layer, size, how, f"{ours:.0f}", f"{theirs:.0f}", f"{ours / theirs:.2f}"))
    header = ("machine", "model", "batch shape", "training", "images/s", "plain twin images/s", "×plain")
    return sources(*machines.values()) + "\n" + markdown(header, body, "llllrrr")


def _cpu_layers(paths: Iterable[str], layers: Iterable[str] | None = None) -> str:
    body, counts = [], set()
    for path in paths:
        train_ms, ratios = _layer_ratios(path, "time_ms"), _layer_ratios(path)
        for (layer, size), by_mode in ratios.items():
            if layers is None or layer in layers:
                counts.add(len(by_mode["train"]))
                per_run = ", ".join(f"{v:.0f}" for v in train_ms[(layer, size)]["train"])
                body.append((layer, size, per_run, _cell(by_mode.get("train")), _cell(by_mode.get("eval"))))
    runs = "one run" if counts == {1} else f"median of {', '.join(map(str, sorted(counts)))} runs"
    header = ("layer", "width / shape", "train step (ms), per run", f"train ×plain ({runs})", "eval ×plain")
    return sources(*paths) + "\n" + markdown(header, body, "llrrr")


@table("layers-issue21-cpu")
def layers_issue21_cpu() -> str:
    """Issue 21's CPU rows: our layers and the orthogonium references in one run, widths 64 / 128."""
    path = "cpu/bench_layers_b64.jsonl"
    ratios, frozen = _layer_ratios(path), _layer_ratios(path, "ratio_to_frozen")
    layers = list(dict.fromkeys(layer for layer, _ in ratios))
    widths = sorted({size for _, size in ratios}, key=int)

    def cells(table: dict, mode: str, layer: str) -> str:
        return " / ".join(_cell(table.get((layer, w), {}).get(mode)) for w in widths)

    body = [
        (layer, cells(ratios, "train", layer), cells(ratios, "eval", layer), cells(frozen, "eval_grad", layer))
        for layer in layers
    ]
    w = " / ".join(widths)
    header = ("layer", f"train ×plain, width {w}", f"eval ×plain, {w}", f"attack step (eval_grad) ×frozen, {w}")
    return sources(path) + "\n" + markdown(header, body, "lrrr")


@table("layers-cpu")
def layers_cpu() -> str:
    return _cpu_layers(["cpu/bench_layers_session13.jsonl"])


@table("layers-cpu-gram")
def layers_cpu_gram() -> str:
    return _cpu_layers(["cpu/bench_layers_cpl_gram.jsonl", "cpu/bench_layers_spectral_gram.jsonl"])


@table("layers-cpu-other")
def layers_cpu_other() -> str:
    return _cpu_layers(["cpu/bench_layers.jsonl"], ("orthogonal", "sll_s"))


# Training throughput.


def _train_throughput(paths: Iterable[str]) -> str:
    steps, loaders = [], []
    for path in paths:
        by_key: dict[tuple, dict[str, dict]] = {}
        for row in rows(path):
            if row["variant"] == "data":
                what = "in memory, random images" if row["loader"] == "device" else f"streamed {row['data']} files"
                loaders.append(
                    (row["model"], row["batch_size"], what, f"{row['images_per_s']:.3g}", f"{row['ratio']:.1f}")
                )
                continue
            key = (row["model"], row["batch_size"], row["precision"], row["compile"])
            by_key.setdefault(key, {})[row["variant"]] = row
        for (model, batch, precision, compiled), pair in by_key.items():
            ours, plain = pair["constrained"]["images_per_s"], pair["plain"]["images_per_s"]
            steps.append(
                (
                    model,
                    batch,
                    precision,
                    "yes" if compiled else "no",
                    f"{ours:.0f}",
                    f"{plain:.0f}",
                    f"{plain / ours:.2f}",
                )
            )
    header = ("model", "batch", "precision", "compile", "images/s", "plain twin images/s", "time ×plain")
    loader_header = ("model", "batch", "data pipeline alone", "images/s", "× the model's best training images/s")
    return (
        sources(*paths) + "\n" + markdown(header, steps, "lrllrrr") + "\n" + markdown(loader_header, loaders, "lrlrr")
    )


@table("train-cpu")
def train_cpu() -> str:
    return _train_throughput(["cpu/bench_train.jsonl", "cpu/bench_train_b2048.jsonl"])


# Issue 19's result rows (benchmarks/results.py).


def _result_rows(machine: str) -> list[str]:
    folder = RESULTS / machine / "results"
    return sorted(f"{machine}/results/{p.name}" for p in folder.glob("*.json") if not p.stem.endswith("-fast"))


def _radius_value(label: str) -> float:
    """``"36/255"`` or ``"1.58"`` as a number (the JSON keys are sorted as text)."""
    top, _, bottom = label.partition("/")
    return float(top) / float(bottom or 1)


@table("results-cpu")
def results_cpu() -> str:
    paths = _result_rows("cpu")
    if not paths:
        return "No row has been run yet.\n"
    body = []
    for path in paths:
        row = document(path)
        budget = f"{row['time_budget_min']:g} min" if row["time_budget_min"] else "–"
        for method, values in row["methods"].items():
            certified = sorted(values["certified"].items(), key=lambda item: _radius_value(item[0]))
            cells = " / ".join(f"{100 * a:.1f}" for _, a in certified)
            body.append(
                (
                    f"`{row['row']}`" + (f" ({row['note']})" if row["note"] else ""),
                    method,
                    f"{100 * values['clean']:.1f}",
                    f"{cells} (ε = {' / '.join(r for r, _ in certified)})",
                    values["examples"],
                    row["epochs"],
                    budget,
                    f"{row['train_wall_s'] / 60:.1f} min",
                    f"{values['certify_s'] / 60:.1f} min",
                )
            )
    header = (
        "row",
        "method",
        "clean %",
        "certified %",
        "test images",
        "epochs",
        "budget",
        "training wall time",
        "certification wall time",
    )
    return sources(*paths) + "\n" + markdown(header, body, "llrlrrrrr")


#: What benchmarks/explore_mnist_10min.sh pins to the recipe as it was before the exploration (not a change).
EXPLORE_BASE = {"model_args.inner_width": 1024, "ema_decay": 0.0}


@table("explore-cpu")
def explore_cpu() -> str:
    """benchmarks/explore_mnist_10min.sh: one change at a time against the 10-minute MNIST recipe."""
    folder = RESULTS / "cpu" / "explore"
    paths = sorted(
        f"cpu/explore/{p.parent.name}/{p.name}" for p in folder.glob("*/*.json") if not p.stem.endswith("-fast")
    )
    if not paths:
        return "No variant has been run yet.\n"
    body = []
    for path in paths:
        row = document(path)
        changed = {k: v for k, v in row["changed"].items() if k != "time_budget" and EXPLORE_BASE.get(k, k) != v}
        values = row["methods"]["lipschitz"]
        certified = sorted(values["certified"].items(), key=lambda item: _radius_value(item[0]))
        body.append(
            (
                f"`{path.split('/')[2]}`",
                ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in changed.items()) or "(the recipe)",
                f"{100 * values['clean']:.1f}",
                " / ".join(f"{100 * a:.1f}" for _, a in certified),
                row["epochs"],
                f"{row['train_wall_s'] / 60:.1f} min",
            )
        )
    header = ("variant", "change", "clean %", "certified % (ε = 0.5 / 1 / 1.58 / 2)", "epochs", "training")
    return sources(*paths) + "\n" + markdown(header, body, "llrlrr")


# The README.

MARKER = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every table regenerated, and the names of the tables that changed."""
    changed = []

    def regenerate(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
        new = TABLES[name]()
        if new != match.group(3):
            changed.append(name)
        return match.group(1) + new + match.group(4)

    return MARKER.sub(regenerate, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table differs")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new, changed = render(text)
    missing = [name for name in TABLES if f"<!-- table: {name} -->" not in text]
    if args.check:
        if changed or missing:
            what = f"table {changed[0]!r} differs from" if changed else f"table {missing[0]!r} is missing from"
            print(f"{args.readme}: {what} what benchmarks/tables.py generates; run python benchmarks/tables.py")
            return 1
        return 0
    if missing:
        print(f"{args.readme}: no markers for {', '.join(missing)}", file=sys.stderr)
    if new != text:
        args.readme.write_text(new)
    print(f"{args.readme}: {len(changed)} of {len(TABLES)} tables regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
