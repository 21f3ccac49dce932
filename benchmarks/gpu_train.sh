#!/usr/bin/env bash
# Issue 18's device run, within 9 minutes on one H100/H200, each section under its own time limit:
#   1. `stablenet bench train`: sll_s and its plain twin in fp32, bf16 and bf16 + compile, and the data pipeline
#      on its own (in memory, and streamed from the CIFAR-10 JPEG copy's files);
#   2. a time-budgeted run (`--time-budget`): the planned and the actual wall time;
#   3. DDP scaling, 1 -> 2 processes through torchrun, where two GPUs are present (skipped otherwise).
# On the device tool: mkdir -p data && cp -r ../shared/data/cifar10-jpeg data/ (git-ignored; DATA=data), then
#   run(command="bash benchmarks/gpu_train.sh", carry=["data"], timeout_s=600)
# Tested on this CPU with QUICK=1 DEVICE=cpu DATA=../shared/data bash benchmarks/gpu_train.sh: the
# same sections on tiny settings (bench --quick, the digits data set, gloo DDP with two processes).
# Results land in $OUT (the device tool's $OUT, else runs/gpu_train); the summary table is printed at the end.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 STABLENET_CACHE=${STABLENET_CACHE:-/tmp/stablenet-cache}
OUT=${OUT:-runs/gpu_train}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data}  # holds cifar10-jpeg/{train,test}.tar.gz
QUICK=${QUICK:-0}
PY=${PY:-python3}
SN="$PY -m stablenet.cli"
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
section() { echo "== $1 ($(date +%T))"; }

if [ "$QUICK" = 1 ]; then
  BENCH_ARGS="--quick --model sll_s --repeats 1"
  # digits, a small dense SLL network: the sections' plumbing in seconds
  RUN_ARGS="--dataset digits --model sll_mlp --model_args.width 64 --model_args.depth 2 --batch-size 64"
  BUDGET_MIN=${BUDGET_MIN:-0.3}
  DDP_EPOCHS=2
else
  BENCH_ARGS=""
  RUN_ARGS="--dataset cifar10 --data-root $DATA --model sll_s --batch-size 512 --precision bf16 --crop-padding 4
    --flip true --channels-last true"
  BUDGET_MIN=${BUDGET_MIN:-2}
  DDP_EPOCHS=2
fi

section "bench train"
# shellcheck disable=SC2086
timeout "${BENCH_S:-270}" $SN bench train --device "$DEVICE" --data-streaming --data-root "$DATA" $BENCH_ARGS \
  --json "$OUT/bench_train.jsonl" || echo "bench train: exit $?"

section "time budget ($BUDGET_MIN min)"
rm -rf "$OUT/runs/budget"
# shellcheck disable=SC2086
timeout "${BUDGET_S:-170}" $SN train $RUN_ARGS --device "$DEVICE" --time-budget "$BUDGET_MIN" --eval-every 1000 \
  --out "$OUT/runs/budget" --quiet || echo "budget run: exit $?"

section "DDP scaling"
NPROC=$($PY -c "import torch; print(torch.cuda.device_count() if '$DEVICE'.startswith('cuda') else 2)")
if [ "$NPROC" -ge 2 ]; then
  for n in 1 2; do
    rm -rf "$OUT/runs/ddp$n"
    # shellcheck disable=SC2086
    timeout "${DDP_S:-90}" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" -m stablenet.cli -- \
      train $RUN_ARGS --device "$DEVICE" --epochs "$DDP_EPOCHS" --eval-every 1000 --out "$OUT/runs/ddp$n" --quiet \
      || echo "ddp $n: exit $?"
  done
else
  echo "one GPU: DDP scaling not measured"
fi

section "summary"
$PY - "$OUT" <<'EOF'
import csv, json, sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
bench = out / "bench_train.jsonl"
if bench.exists():
    print(f"{'model':10s} {'variant':18s} {'precision':9s} {'compile':7s} {'images/s':>10s} {'ratio':>6s}")
    for row in map(json.loads, bench.read_text().splitlines()):
        variant = row["variant"] + (f"/{row['loader']}" if row["loader"] else "")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['model']:10s} {variant:18s} {row['precision'] or '-':9s} {str(row['compile']):7s} "
              f"{row['images_per_s']:10.4g} {ratio:>6s}")


def metrics(run):
    path = out / "runs" / run / "metrics.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


budget = out / "runs" / "budget" / "config.yaml"
if budget.exists():
    plan = yaml.safe_load(budget.read_text()).get("plan", {})
    print(f"time budget: {plan.get('budget_s')} s, planned {plan.get('planned_s')} s, actual {plan.get('actual_s')} s, "
          f"{plan.get('epochs')} epochs")
speeds = [float(rows[-1]["images_per_s"]) if rows else None for rows in (metrics("ddp1"), metrics("ddp2"))]
if all(speeds):
    print(f"DDP: 1 process {speeds[0]:.4g} images/s, 2 processes {speeds[1]:.4g} images/s, "
          f"scaling {speeds[1] / speeds[0]:.2f}x (last epoch)")
EOF
section "done"
