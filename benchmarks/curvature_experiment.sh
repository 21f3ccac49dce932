#!/usr/bin/env bash
# Issue 6 experiment: sll_mlp on MNIST trained plainly, with activation decay, and with SAM (3 epochs each), then
# per variant: Lipschitz-certified accuracy, top Hessian eigenvalue and trace on 1000 test images, and a 21x21
# loss landscape. Ends with benchmarks/results/cpu/curvature/{table.md,landscapes.png}.
# Usage (this CPU, ~30-40 min): bash benchmarks/curvature_experiment.sh
set -euo pipefail
SN=${SN:-.venv/bin/stablenet}
PY=${PY:-.venv/bin/python}
RES=${RES:-21}
OUT=benchmarks/results/cpu/curvature
mkdir -p "$OUT"
for v in base ad sam; do
  run=runs/mnist_curvature_$v
  [ -f "$run/model.safetensors" ] && [ "$(grep -c '^3,' "$run/metrics.csv" || true)" = 1 ] \
    || $SN train -c configs/mnist_curvature_$v.yaml --quiet || $SN train -c configs/mnist_curvature_$v.yaml --resume --quiet
  $SN certify --run "$run" --method lipschitz --data-root ../shared/data/mnist --out "$OUT/lipschitz_$v.jsonl" --quiet
  $SN hessian --run "$run" --data-root ../shared/data/mnist --top-k 1 --trace --trace-samples 30 --num-examples 1000 --seed 0 \
      --json "$OUT/hessian_$v.json"
  $SN landscape --run "$run" --data-root ../shared/data/mnist --dims 2 --resolution "$RES" --num-examples 1000 \
      --seed 0 --out "$OUT/landscape_$v"
done
$PY benchmarks/curvature_table.py "$OUT"
