"""Paired held-out comparison of found plans and contiguous ranges, for docs/SEARCH.md (a check that
looks at held-out text, never part of the search): mean log-likelihood per window of each plan on the
report's sample (first 32,768 tokens of the held-out novel, 64 windows of 512), fp32 like the report,
and the standard error of the per-window difference.
Run: python scripts/research/search_paired_heldout.py   (a few minutes on 2 CPU cores)
"""
import torch, math
torch.set_num_threads(1)
import truedepth
from truedepth import search as S, Plan
from truedepth.data import held_out_text
from truedepth.perplexity import tokenize
model, tok = truedepth.load("default")
held = torch.as_tensor(tokenize(tok, held_out_text(), 32768)[:32768]).view(64, 512)
sc = S.PlanScorer(model, held, "ppl")   # fp32, like the report
def per_window(plan):
    blocks = Plan.parse(plan).blocks(30); first = S.first_changed_block(blocks)
    with torch.no_grad():
        x = sc.inputs[first]
        for b in blocks[first:]: x = sc._run_block(b, x)
        return torch.tensor([float(-sc._log_probs(x[b]).gather(1, sc.input_ids[b, 1:, None]).mean()) for b in range(64)])
for a, b in [("parallel=16:18,parallel=24:28", "parallel=22:28"), ("parallel=16:18,parallel=21:23,parallel=24:28", "parallel=20:28")]:
    wa, wb = per_window(a), per_window(b); d = wa - wb
    print(f"{a} vs {b}: ppl {math.exp(wa.mean()):.3f} vs {math.exp(wb.mean()):.3f}; nll diff {d.mean():+.4f} +- {d.std()/8:.4f} (paired SE, 64 windows); A lower in {(d<0).sum().item()}/64 windows", flush=True)
