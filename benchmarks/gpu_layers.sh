#!/usr/bin/env bash
# One device run for issues 4, 5 and 6 (GPU numbers), in priority order, each section under its own time limit:
#   0. issue 4: every layer's measured Lipschitz constant in float32 with TF32 on (benchmarks/gpu_zoo_check.py);
#   1. issue 4: `stablenet bench layers` (every layer family vs plain layers, CIFAR-10 shapes, and sll_s in bf16);
#   2. issue 6: the curvature experiment with lipconvnet on MNIST (plain, activation decay, SAM);
#   3. issue 5: `stablenet bench smoothing` (sampling-loop efficiency, ResNet-110 images/s at n = 100 000).
# On the device tool: mkdir -p data && cp -r ../shared/data/mnist data/ (git-ignored), then
#   run(command="bash benchmarks/gpu_layers.sh", carry=["data"], timeout_s=...)
# Results land in $OUT (default $OUT from the device tool, else runs/gpu_layers).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 STABLENET_CACHE=${STABLENET_CACHE:-/tmp/stablenet-cache}
OUT=${OUT:-runs/gpu_layers}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data/mnist}
PY=${PY:-python3}
SN="$PY -m stablenet.cli"
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

section() { echo "== $1 ($(date +%T))"; }

section "zoo check (float32, TF32 on)"
timeout 150 $PY benchmarks/gpu_zoo_check.py --device "$DEVICE" | tee "$OUT/zoo_check.txt" || echo "zoo check: exit $?"

section "bench layers"
timeout "${LAYERS_S:-240}" $SN bench layers --device "$DEVICE" --json "$OUT/bench_layers.jsonl" ${LAYERS_ARGS:-} \
  || echo "bench layers: exit $?"

section "curvature experiment (lipconvnet)"
CURV=$OUT/curvature
mkdir -p "$CURV"
for v in base ad sam; do
  run=$OUT/runs/lipconvnet_$v
  timeout "${TRAIN_S:-150}" $SN train -c configs/mnist_curvature_lipconvnet_$v.yaml --data_root "$DATA" \
    --device "$DEVICE" --out "$run" --quiet || { echo "train $v: exit $?"; continue; }
  $SN certify --run "$run" --method lipschitz --data-root "$DATA" --device "$DEVICE" \
    --out "$CURV/lipschitz_$v.jsonl" --quiet || echo "certify $v: exit $?"
  timeout 60 $SN hessian --run "$run" --data-root "$DATA" --top-k 1 --trace --trace-samples 30 --num-examples 1000 \
    --seed 0 --device "$DEVICE" --json "$CURV/hessian_$v.json" || echo "hessian $v: exit $?"
  timeout 60 $SN landscape --run "$run" --data-root "$DATA" --dims 2 --resolution 21 --num-examples 1000 --seed 0 \
    --device "$DEVICE" --out "$CURV/landscape_$v" || echo "landscape $v: exit $?"
done
$PY benchmarks/curvature_table.py "$CURV" "$OUT/runs/lipconvnet_" || echo "curvature table: exit $?"

section "bench smoothing"
timeout "${SMOOTHING_S:-150}" $SN bench smoothing --device "$DEVICE" --json "$OUT/bench_smoothing.jsonl" --quiet \
  || echo "bench smoothing: exit $?"
section "done"
