"""Search for the layer groups that cost least at a target depth.

The paper runs ONE contiguous range of layer pairs in parallel. This command searches a larger
space: any set of disjoint groups of 2 or 3 consecutive layers anywhere in the stack (several
ranges), optionally mixed with skipped layers (--allow-skip), reaching exactly the target depth.
A group of g layers removes g-1 layers of depth, a skipped layer removes one.

Objective, measured on calibration text that differs from the reporting text (default: the five
training novels for calibration, the held-out novel for the report):
  ppl  perplexity of the candidate on the calibration windows
  kl   mean KL divergence from the original model's next-token distribution (nats/token)

Algorithm (cost counted in forward passes over the calibration batch):
  1. one forward of the original model records every layer's input (and the attention inputs);
     a candidate is evaluated by re-running only the layers from the first one it changes,
     so late-layer candidates cost a fraction of a forward (exact same math as the fused model)
  2. zero-cost proxy: cosine similarity between the input a layer sees in the plan and its
     original input (--screen N keeps the N most similar candidates for step 3)
  3. cost of each candidate group measured alone (one forward each)
  4. beam build (--beam, --shortlist): depth level by level, each kept plan is extended by the
     cheapest compatible candidates (ranked by their cost alone) and every extension evaluated
  5. refinement by local swaps (--refine-rounds): replace one group by another group or skip of
     the same size (or the same group shifted by one layer); keep the best improvement
  6. optionally (--baseline) the paper's scheme: for each depth, the best single contiguous range
     of pairs over every start position
  7. final choice (--select-windows, --finalists): the best plans of each depth among all those
     scored (the contiguous ranges included) are scored again on calibration windows the search
     never saw, and the best there is kept: choosing among many plans on one sample favours the
     luckiest; a fresh sample does not
  8. optionally (--report) held-out perplexity of the final plans, computed on the real fused
     model (apply_plan)

Examples:
  truedepth search --target-depth 26
  truedepth search --target-depth 22:29 --baseline --plot search.png --out search.json
  truedepth search --reduce 4 --objective kl --allow-skip --max-group 2
"""

from __future__ import annotations

import argparse
import sys

from ..apps.search import SearchOptions, run_search
from ..utils.options import add_options, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SearchOptions)


def run(args: argparse.Namespace) -> int:
    run_search(from_args(SearchOptions, args, command=" ".join(["truedepth", *sys.argv[1:]])))
    return 0


def resume_note(args: argparse.Namespace) -> str:
    return (
        "Nothing was saved (the search writes --out at the end); run it again, with fewer --target-depth "
        "values or a --budget to make it shorter."
    )
