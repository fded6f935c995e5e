"""Is any plan of the search space better than the contiguous range at depth 28 on held-out text?

ARCHIVED RECORD of the check in docs/research/search-experiments.md (output: docs/results/search_depth28_check.json),
kept next to its log; no test runs it, and the library internals it imports (as of commit ac6c5d8,
2026-12-05) may move. Not part of the search (it looks at the held-out text, which the search
must never do). On the default model, scored from the original layers (truedepth.apps.search.scoring.PlanScorer)
in bf16 on the report's held-out sample: the first 32,768 tokens of the held-out novel, 64 windows
of 512.
  1. the cost of every pair alone (29 plans)
  2. every plan of two disjoint pairs whose pairs' costs alone (nats/token above the original) sum
     to at most 1.25x the cost of parallel=24:28; pair costs are close to additive (a plan
     measured -0.14 to +0.45 perplexity off the sum of its pairs on this model), so plans outside
     that bound cannot come near it.
Run: python docs/research/search_depth28_check.py OUT.json   (17 min, 3.0 GB on 2 CPU cores)
"""

import itertools
import json
import math
import sys

import torch

import truedepth
from truedepth.apps.search import scoring as S
from truedepth.apps.search import search_copy
from truedepth.measure.eval.data import held_out_text
from truedepth.measure.eval.perplexity import tokenize

CONTIGUOUS = "parallel=24:28"


def main(out_path: str) -> None:
    model, tok = truedepth.load("default")
    scorer = S.PlanScorer(
        search_copy(model, torch.bfloat16),
        torch.as_tensor(tokenize(tok, held_out_text(), 32768)[:32768]).view(64, 512),
        "ppl",
    )
    base = math.log(scorer.base)
    out = {"base": scorer.base, "contiguous": scorer.score(CONTIGUOUS), "alone": {}, "pairs_of_pairs": {}}
    for s in range(scorer.num_layers - 1):
        out["alone"][f"parallel={s}:{s + 2}"] = scorer.score(f"parallel={s}:{s + 2}")
    cost = {int(k.split("=")[1].split(":")[0]): math.log(v) - base for k, v in out["alone"].items()}
    bound = 1.25 * (math.log(out["contiguous"]) - base)
    for x, y in itertools.combinations(sorted(cost), 2):
        if x + 2 <= y and cost[x] + cost[y] <= bound:
            key = CONTIGUOUS if (x, y) == (24, 26) else f"parallel={x}:{x + 2},parallel={y}:{y + 2}"
            out["pairs_of_pairs"][key] = scorer.score(key)
            print(
                f"{key:32s} additive estimate {math.exp(base + cost[x] + cost[y]):.3f}  "
                f"measured {out['pairs_of_pairs'][key]:.3f}",
                flush=True,
            )
    json.dump(out, open(out_path, "w"), indent=1)
    best = min(out["pairs_of_pairs"], key=out["pairs_of_pairs"].get)
    print(f"lowest held-out perplexity among {len(out['pairs_of_pairs'])} plans: {best}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "depth28_check.json")
