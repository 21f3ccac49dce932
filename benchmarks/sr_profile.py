"""Where the SR constraint's training cost goes on a CPU (issue 21): ``torch.profiler`` over the forward and backward
of ``sr_conv_rescaling`` (T = 3, float64, as ``SRConv2d`` trains) for a ``C x C x 3 x 3`` kernel, after one warm-up.

Usage: python benchmarks/sr_profile.py [--channels 128] [--rows 8]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from stablenet.bench.provenance import provenance
from stablenet.spectral.rescaling import sr_conv_rescaling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    kernel = torch.randn(args.channels, args.channels, 3, 3, dtype=torch.float64, requires_grad=True)
    sr_conv_rescaling(kernel, 3).sum().backward()
    with profile() as prof:
        sr_conv_rescaling(kernel, 3).sum().backward()
    print(provenance(device=torch.device("cpu")))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
