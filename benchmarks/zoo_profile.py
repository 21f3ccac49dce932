"""Where a training step of the layer zoo spends its GPU time (torch.profiler), for the notes of issue 4.

Profiles, after warm-up, five training steps of ``sll_s`` under bf16 autocast at batch 512 (eager weight maps,
then CUDA-graphed ones) and of one 128-channel ``AOLConv2d`` or ``SRConv2d`` + ReLU at batch 256 (CUDA-graphed
maps), and prints the kernels with the most device time.

Usage: PYTHONPATH=src python3 benchmarks/zoo_profile.py [--device cuda] [--rows 12]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import stablenet.nn as snn
from stablenet.bench.layers import _step_fn
from stablenet.bench.provenance import provenance
from stablenet.models import create_model


def profile_steps(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, bf16: bool, rows: int) -> None:
    step = _step_fn(model, x, "train_bf16" if bf16 else "train", y)  # the benchmark's training step

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in events) / 5e3
    print(f"== {name}: device time per step {device_total:.2f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    print("provenance:", json.dumps(provenance(device=device)))
    torch.manual_seed(0)
    model = create_model("sll_s", 10, 3, 32).to(device).train()
    x = torch.rand(512, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (512,), device=device)
    profile_steps("sll_s bf16 batch 512, eager maps", model, x, y, True, args.rows)
    snn.capture_weight_maps(model)
    profile_steps("sll_s bf16 batch 512, CUDA-graphed maps", model, x, y, True, args.rows)
    x = torch.randn(256, 128, 32, 32, device=device)
    for name, cls in (("AOLConv2d", snn.AOLConv2d), ("SRConv2d", snn.SRConv2d)):
        layer = nn.Sequential(cls(128, 128, 3, padding=1), nn.ReLU()).to(device)
        snn.capture_weight_maps(layer)
        profile_steps(f"{name} 128 ch batch 256, CUDA-graphed map", layer, x, None, False, args.rows)


if __name__ == "__main__":
    main()
