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
python3 - "$OUT/resnet18_cuda.json" <<'PY'
import json, sys
from stablenet.bench.spectral import resnet18_bound_time
runs = {}
for method in ("auto", "gram", "cholesky"):
    resnet18_bound_time("cuda", method)  # warm-up
    results = [resnet18_bound_time("cuda", method) for _ in range(5)]
    results.sort(key=lambda r: r["total_ms"])
    runs[method] = results[len(results) // 2]
    print(method, f"{runs[method]['total_ms']:.1f} ms", f"peak {runs[method].get('peak_mem_mb', 0):.0f} MB")
json.dump(runs, open(sys.argv[1], "w"), indent=1)
PY
