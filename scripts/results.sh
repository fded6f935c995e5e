#!/usr/bin/env bash
# Regenerate docs/RESULTS.md and docs/img/*.png: the effective-depth study of the default model
# (SmolLM2-135M-Instruct, 30 layers) with `truedepth sweep`.
#
#   scripts/results.sh            # run (or resume) every measurement, then write the report
#   REPORT_ONLY=1 scripts/results.sh   # only rewrite the report from runs/results/results.jsonl
#
# Every measurement is appended to $OUT/results.jsonl as it finishes; an interrupted run resumes
# where it stopped. One thread (OMP_NUM_THREADS=1) so that it shares a small machine politely;
# on the shared 2-core CPU it took about 2 hours of wall time from scratch (2026-11-26).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/results}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false

# Perplexity: first 8192 tokens of the held-out novel (Persuasion), disjoint 512-token windows.
sweep() { "$PY" -m truedepth sweep --out "$OUT" --tokens 8192 --window 512 --no-progress "$@"; }

if [ -z "${REPORT_ONLY:-}" ]; then
  # 1. Δ sweep at the default position (range ends at layer L-2 = 28). Skip also at odd Δ, so
  #    that every parallel Δ has a skip at equal depth (Δ/2).
  sweep --transforms parallel --delta 2:17:2
  sweep --transforms skip --delta 1:17
  # 2. In-context learning (lm-eval): last-word task at equal depths, parallel Δ vs skip Δ/2.
  sweep --transforms parallel --delta 2:17:2 --tasks truedepth_austen_lastword --limit 100
  sweep --transforms skip --delta 1:9 --tasks truedepth_austen_lastword --limit 100
  # 3. MMLU (offline, through lm-eval): 0-shot on 3 questions per subject, 5-shot on 1.
  sweep --transforms parallel --delta 8,16 --tasks truedepth_mmlu --limit 3
  sweep --transforms parallel --delta 8 --tasks truedepth_mmlu --num-fewshot 5 --limit 1
  # 4. Which positions tolerate pairing: one pair at every position (Δ=2) against dropping one
  #    layer there (skip Δ=1, the same depth); then a longer range (Δ=8) and skip at equal depth (Δ=4).
  sweep --transforms parallel --delta 2 --start 0:29
  sweep --transforms skip --delta 1 --start 0:30
  sweep --transforms parallel --delta 8 --start 0:23:2
  sweep --transforms skip --delta 4 --start 0:25:4
  # 5. The other transforms of the paper's effective-depth study.
  sweep --transforms shuffle,merge --delta 4:17:4
fi

# Tables, plots and the report from everything measured above.
"$PY" -m truedepth sweep --out "$OUT" --tokens 8192 --window 512 --plot-only \
  --report docs/RESULTS.md --report-img docs/img --report-command "scripts/results.sh"
