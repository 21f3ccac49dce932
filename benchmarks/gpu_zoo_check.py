"""GPU check of the layer zoo with TF32 enabled: the constrained weights keep the layers 1-Lipschitz.

For every layer family, in float32 on the given device with TF32 matmuls and convolutions switched on (the
setting that loses about 1e-3 in float32 products; Note [constraint precision] in ``stablenet.nn.base``): a few
Adam steps, then the constrained weights are computed (``export()``, TF32 still on) and the largest Jacobian
singular value over random inputs is measured for the layer and for its export, with TF32 off so that the
measurement itself is IEEE float32 (``stablenet.precision.ieee_float32``), its norm in float64. Prints one line
per layer and exits non-zero if any measured constant exceeds ``1 + LAYER_ROUNDING_SLACK``. On a GPU it then
trains the capturable layers with their weight maps as CUDA graphs (``stablenet.nn.capture_weight_maps``) next
to eager copies and checks that outputs and parameters agree (relative difference at most 1e-5).

Usage: PYTHONPATH=src python3 benchmarks/gpu_zoo_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

import stablenet.nn as snn
from stablenet.bench.provenance import provenance
from stablenet.nn import LAYER_ROUNDING_SLACK
from stablenet.nn.cuda_graphs import capturable
from stablenet.precision import ieee_float32

C, H = 16, 8
LAYERS = {
    "SLLLinear": (lambda: snn.SLLLinear(256, 512), (256,)),
    "SLLConv2d": (lambda: snn.SLLConv2d(C, 32), (C, H, H)),
    "CPLLinear": (lambda: snn.CPLLinear(256, 512), (256,)),
    "CPLConv2d": (lambda: snn.CPLConv2d(C, 32), (C, H, H)),
    "AOLLinear": (lambda: snn.AOLLinear(256, 256), (256,)),
    "AOLConv2d": (lambda: snn.AOLConv2d(C, C, 3, padding=1), (C, H, H)),
    "SRLinear": (lambda: snn.SRLinear(256, 256), (256,)),
    "SRConv2d": (lambda: snn.SRConv2d(C, C, 3, padding=1), (C, H, H)),
    "SpectralLinear": (lambda: snn.SpectralLinear(256, 256), (256,)),
    "SpectralConv2d": (lambda: snn.SpectralConv2d(C, C, 3, padding=1), (C, H, H)),
    "OrthogonalLinear-bjorck": (lambda: snn.OrthogonalLinear(256, 256), (256,)),
    "OrthogonalLinear-cayley": (lambda: snn.OrthogonalLinear(256, 256, method="cayley"), (256,)),
    "CayleyConv2d": (lambda: snn.CayleyConv2d(C, C, 3), (C, H, H)),
    # the capturable configurations of the Gram-bounded layers (Note [captured weight maps])
    "CPLConv2d-sized": (lambda: snn.CPLConv2d(C, 32, input_size=H), (C, H, H)),
    "SpectralLinear-fixed": (lambda: snn.SpectralLinear(256, 256, n_iter=6), (256,)),
    "SpectralConv2d-fixed": (lambda: snn.SpectralConv2d(C, C, 3, padding=1, input_size=H, n_iter=6), (C, H, H)),
}


def measured(layer: nn.Module, shape: tuple[int, ...], device: torch.device, n_points: int = 4) -> float:
    worst = 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(n_points):
        x = (torch.randn(*shape, generator=g) * 2).to(device)
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x, vectorize=True)
        worst = max(worst, float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()).double(), 2)))
    return worst


GRAPHED = tuple(name for name, (factory, _) in LAYERS.items() if capturable(factory()))


def graphed_matches_eager(name: str, device: torch.device, steps: int = 3) -> float:
    """Largest relative difference between eager and CUDA-graphed training (outputs and parameters)."""
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    eager = factory().to(device)
    graphed = factory().to(device)
    graphed.load_state_dict(eager.state_dict())
    snn.capture_weight_maps(graphed)
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (eager, graphed)]
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(32, *shape, device=device)
        for model, opt in zip((eager, graphed), opts, strict=True):
            opt.zero_grad()
            model._out = model(x)
            model._out.square().sum().backward()
            opt.step()
        worst = max(worst, float((graphed._out - eager._out).abs().max() / eager._out.abs().max()))
    for p, q in zip(eager.parameters(), graphed.parameters(), strict=True):
        worst = max(worst, float((p - q).abs().max() / p.abs().max().clamp_min(1e-30)))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    print("provenance:", json.dumps(provenance(device=device)), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    limit = 1.0 + LAYER_ROUNDING_SLACK
    failed = []
    for name, (factory, shape) in LAYERS.items():
        torch.manual_seed(0)
        layer = factory().to(device)
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        for _ in range(3):
            loss = layer(torch.randn(32, *shape, device=device)).square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(2, *shape, device=device))  # fill the eval cache (and CayleyConv2d's input size)
            exported = layer.export()  # constrained weights computed with TF32 on
        with ieee_float32():
            evaluated = measured(layer, shape, device)
            plain = measured(exported, shape, device)
        worst = max(evaluated, plain)
        status = "ok" if worst <= limit else "FAIL"
        print(f"{name:26s} layer {evaluated:.9f}  export {plain:.9f}  excess {worst - 1:+.2e}  {status}", flush=True)
        if worst > limit:
            failed.append(name)
    for name in GRAPHED if device.type == "cuda" else ():
        try:
            diff = graphed_matches_eager(name, device)
        except RuntimeError as e:  # a capture that fails (a host read in the map) costs its line, not the run
            print(f"{name:26s} CUDA graphs: capture failed: {str(e).splitlines()[0]}  FAIL", flush=True)
            failed.append(f"{name} (graphs)")
            continue
        status = "ok" if diff <= 1e-5 else "FAIL"
        print(
            f"{name:26s} CUDA graphs vs eager, 3 Adam steps: max relative difference {diff:.2e}  {status}", flush=True
        )
        if diff > 1e-5:
            failed.append(f"{name} (graphs)")
    print(f"device {device}, TF32 on; limit 1 + {LAYER_ROUNDING_SLACK:g}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
