#!/usr/bin/env bash
# Issue 19's exploration for the MNIST 10-minute row: the recipe configs/mnist-lipschitz-10min.yaml as it was
# before the exploration (BASE pins what the exploration changed in it: inner width 1024, no EMA) against one
# change at a time (the last two follow up the first results), every variant under the same 10-minute training
# budget on the same machine, one after the other (never two at once: a budgeted run's epochs depend on the CPU
# it gets). Each variant trains into
# runs/explore/VARIANT, is certified on the 10 000 test images and writes
# benchmarks/results/<machine>/explore/VARIANT/mnist-lipschitz-10min.json (the changed keys are in its "changed"
# field); `python benchmarks/tables.py` puts them in benchmarks/README.md. About 11 minutes per variant.
#
# Usage: bash benchmarks/explore_mnist_10min.sh [VARIANT ...]   (default: every variant below)
#        DATA_ROOT=../shared/data/mnist BUDGET=10 DEVICE=cpu RUNS=runs/explore OUT=benchmarks/results/<machine>/explore
#        (the defaults); FAST=1 passes --fast to results.py (digits, two epochs: the test suite's smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${DATA_ROOT:-../shared/data/mnist}
BUDGET=${BUDGET:-10}
DEVICE=${DEVICE:-cpu}
MACHINE=$([ "$DEVICE" = cpu ] && echo cpu || echo gpu)
RUNS=${RUNS:-runs/explore}
OUT=${OUT:-benchmarks/results/$MACHINE/explore}
# --fast trains two epochs without a budget; otherwise every variant gets the same budget
FLAGS=$([ "${FAST:-0}" = 1 ] && echo --fast || echo "--time-budget $BUDGET")

# The recipe before the exploration (benchmarks/tables.py's EXPLORE_BASE hides these values in the table).
BASE="--set model_args.inner_width=1024 --set ema_decay=0.0"
declare -A VARIANTS=(
  [baseline]=""
  [hkr]='--set loss=hkr --set loss_options={"alpha":0.98}'
  [ema]="--set ema_decay=0.99"
  [onecycle]="--set schedule=onecycle"
  [narrow]="--set model_args.inner_width=512"
  [narrower]="--set model_args.inner_width=256"
  [narrow-ema]="--set model_args.inner_width=512 --set ema_decay=0.99"
  [lipconvnet-aol]='--set model=lipconvnet --set model_args={"family":"aol","width":16,"hidden":256}'
)
ORDER=(baseline hkr ema onecycle narrow lipconvnet-aol narrower narrow-ema)
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${ORDER[@]}")
for name in "${selected[@]}"; do
  if [ -z "${VARIANTS[$name]+set}" ]; then
    echo "explore_mnist_10min.sh: unknown variant '$name'; variants: ${ORDER[*]}" >&2
    exit 2
  fi
done
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
for name in "${selected[@]}"; do
  # shellcheck disable=SC2086  # FLAGS, BASE and the variant's --set arguments split on spaces
  "$PYTHON" benchmarks/results.py mnist-lipschitz-10min --data-root "$DATA_ROOT" --device "$DEVICE" \
    --runs "$RUNS/$name" --out "$OUT/$name" --quiet $FLAGS $BASE ${VARIANTS[$name]}
done
