"""``stablenet bench``: :func:`stablenet.bench.run_suite`, printed with :func:`stablenet.bench.format_table`."""

from __future__ import annotations

from dataclasses import dataclass

from stablenet.bench.provenance import write_rows
from stablenet.bench.suites import SUITES, format_table, run_suite
from stablenet.cli.command import DATA_ROOT_HELP, Command, comma_separated, option, pick, quiet_option
from stablenet.train.trainer import resolve_device

__all__ = ["COMMANDS", "BenchArgs", "bench_command"]


@dataclass(frozen=True, kw_only=True)
class BenchArgs:
    """``stablenet bench``; the options after ``repeats`` belong to one suite each (``SUITES[suite].options``)."""

    suite: str = option(positional=True, choices=tuple(SUITES), help="which benchmark")
    quick: bool = option(False, help="a subset of layers, one repeat")
    device: str = option("cpu", help="cpu, cuda, cuda:N")
    repeats: int | None = option(None, help="timed repeats per measurement (median reported)")
    batch_size: int | None = option(
        None,
        help="layers and train suites: batch size (default: layers 256; train: per model, see stablenet.bench.train)",
    )
    data: str | None = option(
        None, help="curvature suite only: random (default, no download) or mnist (lenet trained briefly, test images)"
    )
    families: tuple[str, ...] | None = option(
        None,
        parse=comma_separated,
        help="layers suite only: comma-separated layer families and/or the model to run (default: all and sll_s); "
        "orthogonium_sll, orthogonium_aol add the orthogonium package's layers (if installed) for comparison",
    )
    methods: tuple[str, ...] | None = option(
        None,
        parse=comma_separated,
        help="spectral suite only: comma-separated method rows to run (default: all; see stablenet.bench.spectral)",
    )
    bound_method: str | None = option(
        None,
        help="layers suite only: how spectral and CPL layers bound their circular norm: auto (default), cholesky, gram",
    )
    spectral_n_iter: int | None = option(
        None,
        help="layers suite only: fixed Gram steps of the spectral layers (default: adaptive; fixed ones capture as "
        "CUDA graphs)",
    )
    model: tuple[str, ...] | None = option(
        None,
        parse=comma_separated,
        help="train suite only: comma-separated models (default: sll_mlp,lipconvnet on a CPU, sll_s on CUDA)",
    )
    data_streaming: bool = option(
        False, help="train suite only: also measure the streaming loader over the data set's files"
    )
    data_root: str | None = option(None, help="train suite only, with --data-streaming: " + DATA_ROOT_HELP)
    json: str | None = option(None, help="write the rows to this JSON Lines file")
    quiet: bool = quiet_option()


def bench_command(args: BenchArgs) -> int:
    try:
        rows = run_suite(
            args.suite,
            quick=args.quick,
            device=resolve_device(args.device),
            repeats=args.repeats,
            progress=None if args.quiet else lambda line: print(line, flush=True),
            **pick(args, "batch_size", "data", "families", "methods", "bound_method", "spectral_n_iter", "model"),
            data_streaming=args.data_streaming or None,  # None: not given, so not passed (run_suite)
            data_root=args.data_root,
        )
    except ImportError as e:  # an optional package a requested row needs: a usage error, one line
        raise ValueError(str(e)) from e
    print(format_table(args.suite, rows))
    if args.json:
        write_rows(rows, args.json)
        print(f"rows: {args.json}")
    return 0


COMMANDS = (Command("bench", BenchArgs, bench_command, help="benchmarks (timings and tightness as JSON rows)"),)
