"""Issue 21: what one attack step costs on a trained model, parameters requiring grad (as torch leaves them) against
the same model frozen (Note [cached weights with gradients] in ``stablenet.nn.base``).

An attack step is one forward in eval mode and the gradient of the loss with respect to the input (PGD,
AutoAttack). The model is the digits demo model (``stablenet.workflows.demo.DEMO_CONFIG``) in float64, as
``stablenet verify`` runs it, or the model of a run directory. The two steps alternate; medians of ``--repeats``.
A third column times the uncached path (every forward recomputes the constrained weights), the cost before the
cache served these forwards. Two more time the model exported to plain torch layers (``export_model``), with its
parameters requiring grad and frozen: torch's own cost of a step whose parameters require grad (it records the
parameters' edges in every op), the floor for any constrained model.

Usage: python benchmarks/attack_step.py [--run DIR] [--batch-size 64] [--repeats 50] [--device cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stablenet.bench.provenance import provenance
from stablenet.models import create_model, load_model
from stablenet.nn import base
from stablenet.nn.export import export_model
from stablenet.workflows.demo import DEMO_CONFIG


def attack_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    leaf = x.clone().requires_grad_(True)

    def step() -> None:
        torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def uncached(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with every weight cache computing its map in the forward (the behaviour before the cache)."""

    def run() -> None:
        original = base.WeightCache.get
        base.WeightCache.get = lambda self, module, params, compute: compute()
        try:
            step()
        finally:
            base.WeightCache.get = original

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run directory (default: the demo architecture, random init)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="append the row to this JSON Lines file")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.run is not None:
        model = load_model(args.run)
        name = args.run
    else:
        model = create_model(DEMO_CONFIG["model"], 10, 1, (8, 8), mean=[0.0], std=[1.0], **DEMO_CONFIG["model_args"])
        name = f"demo architecture ({DEMO_CONFIG['model']}, {DEMO_CONFIG['model_args']})"
    device = torch.device(args.device)
    model = model.double().eval().to(device)
    frozen = copy.deepcopy(model).requires_grad_(False)
    exported = export_model(copy.deepcopy(model)).requires_grad_(True)
    x = torch.rand(args.batch_size, 1, 8, 8, dtype=torch.float64, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    steps = {
        "params_require_grad": attack_step(model, x, y),
        "frozen": attack_step(frozen, x, y),
        "uncached": uncached(attack_step(copy.deepcopy(model), x, y)),
        "plain_require_grad": attack_step(exported, x, y),
        "plain_frozen": attack_step(copy.deepcopy(exported).requires_grad_(False), x, y),
    }
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[key].append((time.perf_counter() - start) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "model": name,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        **{f"{k}_ms": v for k, v in ms.items()},
        "ratio_to_frozen": ms["params_require_grad"] / ms["frozen"],
        "uncached_ratio_to_frozen": ms["uncached"] / ms["frozen"],
        "plain_ratio_to_frozen": ms["plain_require_grad"] / ms["plain_frozen"],
        "provenance": provenance(device=device),
    }
    print(
        f"{name}: attack step {ms['params_require_grad']:.2f} ms with parameters requiring grad, "
        f"{ms['frozen']:.2f} ms frozen (x{row['ratio_to_frozen']:.2f}); uncached {ms['uncached']:.2f} ms "
        f"(x{row['uncached_ratio_to_frozen']:.1f}); the exported plain model x{row['plain_ratio_to_frozen']:.2f}"
    )
    if args.json is not None:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
