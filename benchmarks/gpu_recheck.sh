#!/usr/bin/env bash
# Short device re-check after fixes: the zoo check (float32, TF32 on) and the smoothing sampling-loop efficiency
# on the two small models (cifar_cnn, mnist_mlp; ResNet-110 is in benchmarks/gpu_layers.sh).
# On the device tool: run(command="bash benchmarks/gpu_recheck.sh", timeout_s=...)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_recheck}
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 150 python3 benchmarks/gpu_zoo_check.py --device cuda | tee "$OUT/zoo_check.txt"
timeout 120 python3 - "$OUT/bench_smoothing_small.jsonl" <<'PY'
import sys

from stablenet.bench import write_rows
from stablenet.bench.smoothing import bench_smoothing, default_cases

rows = bench_smoothing(device="cuda", cases=default_cases(gpu=False))
for r in rows:
    print(r["model"], r["n"], r["batch_size"], f"{r['samples_per_s']:.4g}", f"{r['plain_samples_per_s']:.4g}",
          f"ratio {r['ratio']:.3f}")
write_rows(rows, sys.argv[1], command="bash benchmarks/gpu_recheck.sh (bench_smoothing, small cases)")
PY
