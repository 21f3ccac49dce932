#!/usr/bin/env bash
# Issue 21 on one GPU, every measurement in one run of about 7 minutes, then one table:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
# 1. the whole ResNet-18 certified zero-padding bound (`auto`: embed + the default circular method) with its peak
#    memory (benchmarks/resnet18_bound.py);
# 2. the circular Gram bound of the 512-channel 3x3 layers (`stablenet bench spectral`, ResNet-18 shapes);
# 3. `stablenet bench layers` (batch 256, 32x32, widths 64 / 128; sll_s in bf16): train / eval / eval_grad ×plain
#    for SR, spectral (torch signature: lazy size, trained with the power-iteration estimate), CPL, Cayley, SLL, AOL;
#    then, if vendor/ holds an orthogonium wheel (carry ["vendor"]), our SLL and AOL beside orthogonium's in one run;
# 4. an attack step on the demo model, parameters requiring grad against frozen (benchmarks/attack_step.py).
# Results land in $OUT (the device tool's, else runs/gpu_session). DEVICE=cpu QUICK=1 runs the plumbing on a CPU in a
# minute or two (tiny sizes, sections 1 and 2 skipped; tests/bench/test_gpu_session_script.py).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_session}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
SN="$PY -m stablenet.cli"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
section() { echo "== $1 ($(date +%T))"; }
if [ -n "${QUICK:-}" ]; then
  REPEATS=1; LAYERS="--quick --batch-size 2 --families spectral,sll"; BATCHES="1 8"
else
  REPEATS=5; LAYERS=""; BATCHES="1 256"
fi

section "ResNet-18 bound"
if [ -z "${QUICK:-}" ]; then
  timeout 120 $PY benchmarks/resnet18_bound.py --device "$DEVICE" --methods embed --repeats "$REPEATS" --memory \
    --json "$OUT/resnet18.json" || echo "resnet18: exit $?"
fi

section "circular Gram bound, ResNet-18 shapes"
[ -n "${QUICK:-}" ] || timeout 120 $SN bench spectral --device "$DEVICE" --repeats "$REPEATS" --quiet ${QUICK:+--quick} \
  --methods circular_gram_certified --json "$OUT/bench_spectral.jsonl" || echo "bench spectral: exit $?"

section "bench layers"
timeout 240 $SN bench layers --device "$DEVICE" $LAYERS --json "$OUT/bench_layers.jsonl" || echo "bench layers: exit $?"

section "bench layers: orthogonium references"
# The independent SLL and AOL layers beside ours in one run, if a wheel was carried (no network on the device):
# copy it into the git-ignored vendor/ (pip download --no-deps orthogonium -d vendor) and carry ["vendor"].
wheel=$(ls vendor/orthogonium-*.whl 2>/dev/null | head -n 1)
PYDEPS=${TMPDIR:-/tmp}/stablenet-gpu-session-pydeps
if [ -n "$wheel" ] && $PY -m pip install --quiet --no-deps --upgrade --target "$PYDEPS" "$wheel"; then
  PYTHONPATH="$PYTHONPATH:$PYDEPS" timeout 90 $SN bench layers --device "$DEVICE" ${QUICK:+--quick --batch-size 2} \
    --families sll,aol,orthogonium_sll,orthogonium_aol --json "$OUT/bench_layers_refs.jsonl" \
    || echo "bench layers refs: exit $?"
else
  echo "no vendor/orthogonium-*.whl: reference rows skipped"
fi

section "attack step on the demo model"
for b in $BATCHES; do
  timeout 120 $PY benchmarks/attack_step.py --device "$DEVICE" --batch-size "$b" --repeats $((REPEATS * 20)) \
    --json "$OUT/attack_step.jsonl" || echo "attack step: exit $?"
done

section "table"
$PY - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def rows(name):
    path = out / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


print(f"{'measurement':58s} {'value':>12s}  target")
resnet = out / "resnet18.json"
if resnet.exists():
    doc = json.loads(resnet.read_text())
    for method, ms in doc.get("median_ms", {}).items():
        first = (doc.get("runs", {}).get(method) or [{}])[0]
        peaks = {k: v for k, v in first.items() if "peak" in k}
        print(f"{'ResNet-18 bound, ' + method:58s} {ms:9.1f} ms  <= 50 ms, <= 2 GB {peaks}")
for r in rows("bench_spectral.jsonl"):
    if r.get("shape", [0])[0] == 512:
        label = f"circular Gram bound {r['method']} {r['layer']}"
        print(f"{label[:58]:58s} {r['time_ms']:9.2f} ms  <= 5 ms")
for r in rows("bench_layers.jsonl"):
    label = f"{r['layer']} width {r.get('width', '?')} {r['mode']}"
    extra = f" (x{r['ratio_to_frozen']:.2f} frozen)" if "ratio_to_frozen" in r else ""
    print(f"{label:58s} {r['ratio_to_plain']:9.2f} x   {extra}")
for r in rows("bench_layers_refs.jsonl"):
    if r["mode"] == "train":
        label = f"reference run: {r['layer']} width {r.get('width', '?')} train"
        print(f"{label:58s} {r['ratio_to_plain']:9.2f} x   ours <= orthogonium's")
for r in rows("attack_step.jsonl"):
    print(f"{'attack step, demo model, batch ' + str(r['batch_size']):58s} {r['ratio_to_frozen']:9.2f} x   <= 1.1 x frozen")
PY
section "done"
