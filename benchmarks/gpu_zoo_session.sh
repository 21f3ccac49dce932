#!/usr/bin/env bash
# One device run for issue 4 (the layer zoo on a GPU), each section under its own time limit:
#   1. benchmarks/gpu_zoo_check.py: every layer's measured Lipschitz constant with TF32 on, and CUDA-graphed
#      training (stablenet.nn.capture_weight_maps) against eager training;
#   2. `stablenet bench layers` three times, merged into bench_layers_graphs.jsonl (benchmarks/merge_runs.py: each
#      row with its run index; benchmarks/tables.py reports the median of the three);
#   3. spectral layers with a fixed Gram step count (capturable), and the ResNet-18 bound of issue 3;
#   4. benchmarks/zoo_profile.py: where sll_s's bf16 step spends its GPU time.
# On the device tool: run(command="bash benchmarks/gpu_zoo_session.sh", timeout_s=...); no data needed.
# Results land in $OUT (default $OUT from the device tool, else runs/gpu_zoo).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_zoo}
PY=${PY:-python3}
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
section() { echo "== $1 ($(date +%T))"; }

section "zoo check (float32, TF32 on; CUDA graphs vs eager)"
timeout 150 $PY benchmarks/gpu_zoo_check.py --device cuda | tee "$OUT/zoo_check.txt" || echo "zoo check: exit $?"
for i in 1 2 3; do
  section "bench layers, run $i"
  timeout "${LAYERS_S:-150}" $PY -m stablenet.cli bench layers --device cuda --json "$OUT/bench_layers_run$i.jsonl" \
    || echo "bench layers $i: exit $?"
done
$PY benchmarks/merge_runs.py "$OUT/bench_layers_graphs.jsonl" "$OUT"/bench_layers_run{1,2,3}.jsonl \
  && rm "$OUT"/bench_layers_run{1,2,3}.jsonl || echo "merge runs: exit $?"
section "bench layers: spectral layers with 6 fixed Gram steps (eager and CUDA graphs)"
timeout 120 $PY -m stablenet.cli bench layers --device cuda --families spectral --spectral-n-iter 6 \
  --json "$OUT/bench_layers_spectral_fixed.jsonl" || echo "spectral fixed: exit $?"
section "ResNet-18 certified bound (issue 3)"
timeout 120 $PY benchmarks/resnet18_bound.py --device cuda --methods embed,gram --repeats 5 --memory \
  --json "$OUT/resnet18_cuda.json" || echo "resnet18: exit $?"
timeout 60 $PY benchmarks/resnet18_bound.py --device cuda --methods embed --repeats 5 --memory --budget none \
  --json "$OUT/resnet18_cuda_no_budget.json" || echo "resnet18 without a budget: exit $?"
section "profile"
timeout 90 $PY benchmarks/zoo_profile.py --device cuda | tee "$OUT/zoo_profile.txt" || echo "profile: exit $?"
section "done"
