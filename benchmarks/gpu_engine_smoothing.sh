#!/usr/bin/env bash
# One short device run for the spectral engine (issue 3) and the smoothing loop (issue 5):
#   run(command="bash benchmarks/gpu_engine_smoothing.sh", timeout_s=420)  (named gpu_session.sh until issue 21)
# 1. `stablenet bench spectral` on cuda: the Gram, Cholesky and baseline rows on all ResNet-18 shapes (the
#    circular exact reference in float64 on the CPU: a GPU eigensolver takes seconds per layer);
# 2. the certified zero-padding bound over all 20 ResNet-18 convolutions per method (benchmarks/resnet18_bound.py),
#    a profile of the default, and where the Gram iteration's time goes (benchmarks/gram_gpu_micro.py);
# 3. `stablenet bench smoothing` on cuda (noise chunks on, the default) and the two small cases without chunks.
# Results land in $OUT (the device tool's, else runs/gpu_session).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
PY=${PY:-python3}
SN="$PY -m stablenet.cli"
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
section() { echo "== $1 ($(date +%T))"; }

section "bench spectral"
timeout "${SPECTRAL_S:-200}" $SN bench spectral --device cuda --repeats 5 --quiet \
  --methods circular_gram,circular_gram_certified,circular_cholesky_certified,zeros_embed_certified,zeros_embed_cholesky_certified,zeros_spatial_gram,baseline_reshaped_kernel,baseline_araujo \
  --json "$OUT/bench_spectral_cuda.jsonl" > "$OUT/bench_spectral_table.txt" || echo "bench spectral: exit $?"
cat "$OUT/bench_spectral_table.txt"

section "ResNet-18 bound"
timeout "${RESNET_S:-90}" $PY benchmarks/resnet18_bound.py --device cuda --methods embed,cholesky,gram --repeats 5 \
  --json "$OUT/resnet18_cuda.json" || echo "resnet18: exit $?"
timeout 30 $PY benchmarks/resnet18_bound.py --device cuda --profile embed || echo "profile: exit $?"
timeout 60 $PY benchmarks/gram_gpu_micro.py --device cuda > "$OUT/gram_gpu_micro.txt" || echo "micro: exit $?"
head -n 10 "$OUT/gram_gpu_micro.txt"

section "bench smoothing"
timeout "${SMOOTHING_S:-120}" $SN bench smoothing --device cuda --json "$OUT/bench_smoothing.jsonl" \
  || echo "bench smoothing: exit $?"
timeout 60 $PY - "$OUT/bench_smoothing_unchunked.jsonl" <<'PY' || echo "unchunked: exit $?"
import sys

import torch

from stablenet.bench import write_rows
from stablenet.bench.smoothing import bench_smoothing, default_cases
from stablenet.smoothing import sampling

x = torch.rand(30, 1, 28, 28, device="cuda")
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).cuda()
for chunk in (0, None):
    counts = sampling.class_counts(model, x, 250, 0.5, 10, 1000, sampling.make_generator(0, x.device), chunk)
    assert torch.equal(counts.sum(1).cpu(), torch.full((30,), 250)), counts.sum(1)
print("chunked and unchunked counts sum to n on cuda")
sampling.GPU_CHUNK_BYTES = 0
rows = bench_smoothing(device="cuda", cases=default_cases(gpu=False))
for r in rows:
    print("unchunked", r["model"], f"ratio {r['ratio']:.3f}", f"noise bound {r['noise_bound']:.3f}")
write_rows(rows, sys.argv[1], command="bash benchmarks/gpu_engine_smoothing.sh (bench_smoothing, GPU_CHUNK_BYTES = 0)")
PY
section "done"
