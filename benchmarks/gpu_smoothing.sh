#!/usr/bin/env bash
# MNIST randomized-smoothing recipe (issue 5): train lenet at sigma = 0.25, 0.5, 1.0 with noise augmentation,
# certify the first MAX_EXAMPLES test images with Cohen et al.'s certify (n0 = 100, n = N, alpha = 0.001), report.
# On the device tool: mkdir -p data && cp -r ../shared/data/mnist data/ (git-ignored), then
#   run(command="bash benchmarks/gpu_smoothing.sh", carry=["data"], timeout_s=...)
# Small CPU dry run: EPOCHS=1 N=200 MAX_EXAMPLES=10 DEVICE=cpu OUT=/tmp/dry bash benchmarks/gpu_smoothing.sh
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 STABLENET_CACHE=${STABLENET_CACHE:-/tmp/stablenet-cache}
OUT=${OUT:-runs/gpu_smoothing}
EPOCHS=${EPOCHS:-20} N=${N:-100000} MAX_EXAMPLES=${MAX_EXAMPLES:-1000} DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data/mnist}
mkdir -p "$OUT"
PY=${PY:-python3}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
for tag in 025 050 100; do
  sigma=$(awk "BEGIN{print $tag/100}")
  run="$OUT/run_sigma$tag"
  start=$(date +%s)
  $PY -m stablenet.cli train -c configs/mnist_smoothing_sigma$tag.yaml --epochs "$EPOCHS" --data_root "$DATA" \
      --device "$DEVICE" --out "$run" --quiet
  mid=$(date +%s)
  $PY -m stablenet.cli certify --run "$run" --data-root "$DATA" --method smoothing --sigma "$sigma" --n0 100 \
      --n "$N" --alpha 0.001 --batch-size 10000 --max-examples "$MAX_EXAMPLES" --device "$DEVICE" \
      --out "$OUT/mnist_smoothing_sigma$tag.jsonl" --quiet
  end=$(date +%s)
  echo "sigma=$sigma train_s=$((mid - start)) certify_s=$((end - mid))" | tee -a "$OUT/timings.txt"
done
$PY -m stablenet.cli report "$OUT"/mnist_smoothing_sigma*.jsonl --out "$OUT/report" \
    --names "sigma=0.25,sigma=0.50,sigma=1.00"
cat "$OUT/report/report.md"
# Certification throughput vs plain forward (issue 5 benchmark).
$PY -m stablenet.cli bench smoothing --device "$DEVICE" --json "$OUT/bench_smoothing.jsonl" --quiet
