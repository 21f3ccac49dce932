#!/usr/bin/env bash
# Issue 19: every CPU row of the result tables, one after the other (hours on the 2-core development CPU: run it
# in the background, `nohup bash benchmarks/results.sh > runs/results.log 2>&1 &`). Each row trains its recipe in
# runs/results/ROW, certifies it and writes benchmarks/results/cpu/results/ROW.json (benchmarks/results.py); a
# killed run resumes where it stopped when the script is started again.
# FAST=1 runs every row on digits with a tiny network in about a minute (the plumbing only).
set -uo pipefail
PY=${PY:-.venv/bin/python}
MNIST=${MNIST:-../shared/data/mnist}
DATA=${DATA:-../shared/data}
FLAGS=${FAST:+--fast}
for row in mnist-lipschitz-10min mnist-lipschitz mnist-smoothing-s025 mnist-smoothing-s050 mnist-smoothing-s100; do
  echo "== $row ($(date +%T))"
  $PY benchmarks/results.py "$row" --data-root "$MNIST" --quiet $FLAGS ${OUT:+--out "$OUT"} ${RUNS:+--runs "$RUNS"} \
    || echo "$row: exit $?"
done
echo "== cifar10-lipschitz-30min-cpu ($(date +%T))"
$PY benchmarks/results.py cifar10-lipschitz-30min-cpu --data-root "$DATA" --quiet $FLAGS ${OUT:+--out "$OUT"} \
  ${RUNS:+--runs "$RUNS"} || echo "cifar10-lipschitz-30min-cpu: exit $?"
echo "== done ($(date +%T))"
