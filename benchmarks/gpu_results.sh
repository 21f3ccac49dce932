#!/usr/bin/env bash
# Issue 19's GPU row: the 10-minute CIFAR-10 recipe under --time-budget 9 on one H100/H200, certified on the
# whole test set (the JPEG copy of CIFAR-10), the row printed and written to $OUT.
# On the device tool: mkdir -p data && cp -r ../shared/data/cifar10-jpeg data/ (git-ignored), then
#   run(command="bash benchmarks/gpu_results.sh", carry=["data"], timeout_s=600)
# Tested on this CPU with a tiny network and budget (the plumbing only):
#   DEVICE=cpu BUDGET=1.5 DATA=../shared/data EXTRA="--set model_args.width=8 --set model_args.n_conv=1
#   --set model_args.n_dense=1 --set model_args.dense_inner=32 --set compile=false" bash benchmarks/gpu_results.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_results}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data}
BUDGET=${BUDGET:-9}
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
$PY benchmarks/results.py cifar10-10min-gpu --data-root "$DATA" --device "$DEVICE" --time-budget "$BUDGET" \
  --out "$OUT" --runs "$OUT/runs" ${EXTRA:-} || echo "cifar10-10min-gpu: exit $?"
cat "$OUT"/cifar10-10min-gpu.json 2>/dev/null || true
