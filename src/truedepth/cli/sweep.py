"""The effective-depth study: apply each transform to Δ consecutive layers, for many Δ and start
positions, and measure what is lost. Perplexity always; lm-evaluation-harness tasks with --tasks.

Transforms of the Δ layers start..start+Δ-1 (plan strings in `truedepth plan --help` grammar):
  parallel  parallel=s:s+Δ   consecutive pairs run in parallel   depth L - Δ/2   (Δ even)
  merge     merge=s:s+Δ      each pair replaced by its mean      depth L - Δ/2   (Δ even)
  skip      skip=s:s+Δ       the Δ layers are dropped            depth L - Δ
  shuffle   shuffle=s:s+Δ@S  the Δ layers run in a seeded order  depth L
            (S = the first seed >= --seed whose order differs from the original)
Δ is the number of layers transformed, as on the x axis of the paper's effective-depth figure.
At EQUAL DEPTH, parallel Δ compares with skip Δ/2: the Pareto plot (metric against depth) shows
both on one axis.

Start position (--start):
  end      (default) the range ends 2 layers before the last (start = L-2-Δ), the paper's choice:
           the last layers are the least tolerant
  center   the range is centred in the model (start = (L-Δ)//2)
  A:B[:S]  every start from A to B-1 (step S; end exclusive, as in plans), or a comma list:
           a position scan
Every (transform, Δ, start) that fits the model is evaluated, the base model too.

Resumable: every finished measurement is appended to OUT/results.jsonl; a rerun with the same
settings skips it. Several runs into one OUT (a Δ sweep, then a start scan, then tasks on a few
plans) add up. After each run OUT holds sweep.csv, sweep.json and the plots delta.png (metric
against Δ at the default position), start.png (metric against start at fixed Δ) and pareto.png
(metric against depth, or against measured decode time per token with --bench BENCH.json from
`truedepth bench --json`).

Examples:
  truedepth sweep --transforms parallel,skip --delta 2:17:2 --out runs/sweep
  truedepth sweep --transforms parallel,skip --delta 8 --start 0:23:2 --out runs/sweep
  truedepth sweep --transforms parallel --delta 4:17:4 --tasks truedepth_austen_lastword --limit 100 --out runs/sweep
  truedepth sweep --out runs/sweep --plot-only --bench runs/bench.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..apps.sweep.core import TRANSFORMS, Sweep, num_layers_of, parse_transforms, sweep_points
from ..apps.sweep.run import check_sweep, run_study
from ..apps.sweep.tables import format_table
from ..core.plan import parse_int_ranges
from ..measure.eval.evaluate import task_list
from ..utils.device import device_and_dtype
from .common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, plan=False)
    parser.add_argument("--transforms", default="parallel,skip",
                        help=f"comma list of {', '.join(TRANSFORMS)}. Default: %(default)s")
    parser.add_argument("--delta", default="2:17:2",
                        help="Δ values (layers transformed): range A:B[:STEP] (end exclusive, as in plans: "
                             "2:17:2 is 2, 4, ..., 16) or comma list. "
                             "Default: %(default)s")
    parser.add_argument("--start", default="end",
                        help="'end' (range ends at layer L-2, the paper's placement), 'center', or start "
                             "layers: range A:B[:STEP] (end exclusive) or comma list (a position scan). Default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed. Default: %(default)s")
    parser.add_argument("--out", default="runs/sweep", help="output folder (results.jsonl, CSV, JSON, plots); "
                                                            "rerunning into it resumes. Default: %(default)s")
    parser.add_argument("--text", default="default", help="perplexity text (see `truedepth eval --help`). "
                                                          "Default: the held-out novel")
    parser.add_argument("--tokens", type=int, default=8192, help="perplexity tokens. Default: %(default)s")
    parser.add_argument("--window", type=int, default=512, help="perplexity window. Default: %(default)s")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: disjoint windows)")
    parser.add_argument("--tasks", default=None,
                        help="lm-eval tasks for every point too, e.g. truedepth_austen_lastword,truedepth_mmlu")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for --tasks")
    parser.add_argument("--limit", type=int, default=None, help="at most N examples per task (per MMLU subject)")
    parser.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    parser.add_argument("--bench", default=None, help="a `truedepth bench --json` file: Pareto plot against "
                                                      "measured decode time instead of depth")
    parser.add_argument("--bench-mode", default=None, help="bench mode to read (default: the first in the file)")
    parser.add_argument("--list", action="store_true", help="print the plans and depths, evaluate nothing")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw tables and plots from OUT/results.jsonl, evaluate nothing")
    parser.add_argument("--report", default=None, metavar="MD",
                        help="also write a Markdown report (tables, computed findings, comparison with the "
                             "paper) of everything in OUT to this file")
    parser.add_argument("--report-img", default=None, metavar="DIR",
                        help="folder for the report's PNG plots (default: img/ next to the report)")
    parser.add_argument("--report-command", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    device, dtype = device_and_dtype(args.device, args.dtype)
    return Sweep(out=Path(args.out), transforms=parse_transforms(args.transforms),
                 deltas=parse_int_ranges(args.delta, "--delta", was_inclusive=True), start=args.start, seed=args.seed,
                 tasks=task_list(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit, text=args.text,
                 tokens=args.tokens, window=args.window, stride=args.stride, model=args.model, dtype=dtype,
                 device=device, bench=Path(args.bench) if args.bench else None, bench_mode=args.bench_mode,
                 progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    sweep = sweep_from_args(args)
    check_sweep(sweep, tasks=False)
    num_layers = num_layers_of(args.model)
    points, notes = sweep_points(sweep.transforms, sweep.deltas, sweep.start, num_layers,
                                 include_base=not args.no_base)
    for note in notes:
        print(f"sweep: {note}", file=sys.stderr)
    if args.list:
        for p in points:
            plan = p.plan(sweep.seed)
            print(f"{str(plan):<24} depth {plan.depth(num_layers)}")
        return 0
    rows = run_study(sweep, points, notes, plot_only=args.plot_only, report=Path(args.report) if args.report else None,
                     report_img=Path(args.report_img) if args.report_img else None,
                     report_command=args.report_command)
    print(format_table(rows))
    print(f"\nwrote {sweep.out}/sweep.csv, sweep.json and plots (delta.png, start.png, pareto.png where "
          "there are points for them)", file=sys.stderr)
    return 0


def resume_note(args: argparse.Namespace) -> str:
    return (f"Every finished point is in {args.out}/results.jsonl; run the same command again to go on "
            "(finished points are skipped).")
