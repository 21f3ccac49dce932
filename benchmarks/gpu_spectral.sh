#!/usr/bin/env bash
# GPU check for the spectral engine (issue 3), run through the device tool:
#   run(command="bash benchmarks/gpu_spectral.sh", timeout_s=420)
# Writes $OUT/bench_spectral_cuda.jsonl (one row per method x layer) and $OUT/resnet18_cuda.json.
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m stablenet.cli bench spectral --device cuda --repeats 3 --json "$OUT/bench_spectral_cuda.jsonl" --quiet > "$OUT/bench_table.txt"; tail -n 60 "$OUT/bench_table.txt"
python3 benchmarks/resnet18_bound.py --device cuda --methods auto,gram,cholesky --repeats 5 \
  --json "$OUT/resnet18_cuda.json"
