"""Paired held-out comparison of found plans and contiguous ranges, for docs/research/search-experiments.md
(a check that looks at held-out text, never part of the search): mean log-likelihood per window of each plan on the
report's sample (first 32,768 tokens of the held-out novel, 64 windows of 512), fp32 like the report,
and the standard error of the per-window difference.
Run: python docs/research/search_paired_heldout.py   (5 min on 2 CPU cores)
ARCHIVED RECORD, kept next to its log; no test runs it, and the library internals it imports (as of
commit ac6c5d8, 2026-12-05) may move.
"""

import math

import torch

import truedepth
from truedepth.apps.search import scoring as S
from truedepth.measure.eval.data import held_out_text
from truedepth.measure.eval.perplexity import tokenize

PAIRS = [
    ("parallel=16:18,parallel=24:28", "parallel=22:28"),  # depth 27: found vs best contiguous range
    ("parallel=16:18,parallel=21:23,parallel=24:28", "parallel=20:28"),
]  # depth 26

torch.set_num_threads(1)
model, tok = truedepth.load("default")
held = torch.as_tensor(tokenize(tok, held_out_text(), 32768)[:32768]).view(64, 512)
scorer = S.PlanScorer(model, held, "ppl")  # fp32, like the report
for a, b in PAIRS:
    wa, wb = scorer.window_losses(a), scorer.window_losses(b)
    d = wa - wb
    print(
        f"{a} vs {b}: ppl {math.exp(wa.mean()):.3f} vs {math.exp(wb.mean()):.3f}; nll diff {d.mean():+.4f} "
        f"+- {d.std() / math.sqrt(len(d)):.4f} (paired SE, {len(d)} windows); "
        f"A lower in {(d < 0).sum().item()}/{len(d)} windows",
        flush=True,
    )
