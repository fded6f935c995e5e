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

from ..apps.search.core import OBJECTIVES
from ..apps.search.run import SearchOptions, run_search
from .common import add_model_arguments, options


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, plan=False)
    target = parser.add_argument_group("target (exactly one)")
    target.add_argument("--target-depth", metavar="D", help="depth(s) to reach: 26, a list 28,26,24 or a range 22:29 (end exclusive: 22..28)")
    target.add_argument("--reduce", metavar="K", help="layers of depth to remove instead: 4, a list or a range 2:9 (end exclusive: 2..8)")
    space = parser.add_argument_group("search space and objective")
    space.add_argument("--objective", choices=OBJECTIVES, default="ppl",
                       help="ppl: calibration perplexity; kl: KL divergence from the original model. "
                            "Default: %(default)s")
    space.add_argument("--max-group", type=int, choices=(2, 3), default=3,
                       help="largest group of consecutive layers run in parallel. Default: %(default)s")
    space.add_argument("--allow-skip", action="store_true", help="also allow dropping single layers")
    space.add_argument("--calib", metavar="TEXT", default="austen-train",
                       help="calibration text: 'austen-train' (five novels, not the held-out one), "
                            "'other-domain', 'austen:<name>', a file, or a datasets name. Default: %(default)s")
    space.add_argument("--calib-windows", metavar="N", type=int, default=16, help="calibration windows. Default: %(default)s")
    space.add_argument("--calib-length", metavar="T", type=int, default=512, help="tokens per window. Default: %(default)s")
    space.add_argument("--select-windows", metavar="N", type=int, default=48,
                       help="more calibration windows, never seen by the search, that make the final choice among "
                            "the --finalists best plans of each depth (0: keep the search's own pick). "
                            "Default: %(default)s")
    space.add_argument("--finalists", metavar="F", type=int, default=6,
                       help="plans per depth re-scored on the --select-windows. Default: %(default)s")
    algo = parser.add_argument_group("algorithm and cost")
    algo.add_argument("--beam", metavar="B", type=int, default=2, help="plans kept per depth level. Default: %(default)s")
    algo.add_argument("--shortlist", metavar="M", type=int, default=6,
                      help="cheapest candidates tried per plan and step. Default: %(default)s")
    algo.add_argument("--refine-rounds", metavar="R", type=int, default=1, help="rounds of local swaps. Default: %(default)s")
    algo.add_argument("--screen", metavar="N", type=int, default=None,
                      help="measure alone only the N candidates with the best cosine proxy (default: all)")
    algo.add_argument("--budget", metavar="N", type=int, default=None,
                      help="soft cap on full-plan evaluations after the proxies; when reached, each depth level "
                           "still gets one evaluation so the target is reached (default: no cap)")
    out = parser.add_argument_group("comparison and output")
    out.add_argument("--baseline", action="store_true",
                     help="also find the best single contiguous range of pairs for each depth (the paper's scheme)")
    out.add_argument("--report", metavar="TEXT", default="default",
                     help="text to report held-out perplexity of the final plans on, with the fused model: "
                          "'default' (held-out novel), a file, ... or 'none'. Each plan is fused on a copy of "
                          "the model, so this needs room for two copies: for a large model pass 'none' and run "
                          "`truedepth eval --plan` on the plans afterwards. Default: %(default)s")
    out.add_argument("--report-tokens", metavar="N", type=int, default=8192, help="held-out tokens. Default: %(default)s")
    out.add_argument("--report-window", metavar="T", type=int, default=512, help="held-out window. Default: %(default)s")
    out.add_argument("--out", metavar="FILE", help="write the plans, objectives and counts as JSON to this file")
    out.add_argument("--plot", metavar="PNG", help="write a PNG of the objective against depth to this file")
    algo.add_argument("--search-dtype", metavar="DTYPE", default=None,
                      help="dtype of the copy the search scores plans with (e.g. bf16: ~2-3x faster on CPUs "
                           "with AMX, rankings within ~0.1%%; slower on some CPUs with avx512_bf16 alone); "
                           "'auto': bf16 where a fraction of a second of timing finds it 1.2x faster than fp32. "
                           "Held-out numbers still use --dtype. Default: the model's dtype, no copy")
    out.add_argument("--threads", metavar="N", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    run_search(options(SearchOptions, args, command=" ".join(["truedepth", *sys.argv[1:]])))
    return 0


def resume_note(args: argparse.Namespace) -> str:
    return ("Nothing was saved (the search writes --out at the end); run it again, with fewer --target-depth "
            "values or a --budget to make it shorter.")
