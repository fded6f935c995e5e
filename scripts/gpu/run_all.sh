#!/usr/bin/env bash
# The one device run: every GPU check of the project, each under its own time limit, so that one
# slow part cannot eat the others' time. Results: JSON per check under $OUT, one combined log.
#   OUT=out bash scripts/gpu/run_all.sh            # on the GPU machine (~9 min)
#   OUT=out SMOKE=--smoke bash scripts/gpu/run_all.sh   # on CPU: tiny shapes, checks the plumbing
set -u
OUT=${OUT:-out}
SMOKE=${SMOKE:-}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/all.log"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$log"
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0))s" | tee -a "$log"
}
step core 75 $PY tests/helpers/gpu_core.py --out "$OUT" $SMOKE
step bench 360 $PY scripts/gpu/bench.py --out "$OUT" --budget 320 $SMOKE
step finetune 65 $PY scripts/gpu/finetune.py --out "$OUT" $SMOKE
step tp 55 $PY scripts/gpu/tp.py --out "$OUT" $SMOKE
echo "=== files"; ls -la "$OUT"
grep -E "^\{'arch'" "$log" | tail -8
[ -f "$OUT/bench_gpu.json" ] && $PY scripts/gpu/bench_to_md.py "$OUT/bench_gpu.json" | head -60
