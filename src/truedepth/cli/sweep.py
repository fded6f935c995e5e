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

from ..apps.sweep.options import SweepOptions
from ..apps.sweep.points import num_layers_of, sweep_points
from ..apps.sweep.study import check_sweep, run_study, sweep_of
from ..apps.sweep.tables import format_table
from ..utils.options import add_options, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SweepOptions)


def run(args: argparse.Namespace) -> int:
    opts = from_args(SweepOptions, args)
    sweep = sweep_of(opts)
    check_sweep(sweep, tasks=False)
    num_layers = num_layers_of(opts.model)
    points, notes = sweep_points(sweep.transforms, sweep.deltas, sweep.start, num_layers, include_base=not opts.no_base)
    for note in notes:
        print(f"sweep: {note}", file=sys.stderr)
    if opts.list_plans:
        for p in points:
            plan = p.plan(sweep.seed)
            print(f"{str(plan):<24} depth {plan.depth(num_layers)}")
        return 0
    rows = run_study(
        sweep,
        points,
        notes,
        plot_only=opts.plot_only,
        report=Path(opts.report) if opts.report else None,
        report_img=Path(opts.report_img) if opts.report_img else None,
        report_command=opts.report_command,
    )
    print(format_table(rows))
    print(
        f"\nwrote {sweep.out}/sweep.csv, sweep.json and plots (delta.png, start.png, pareto.png where "
        "there are points for them)",
        file=sys.stderr,
    )
    return 0


def resume_note(args: argparse.Namespace) -> str:
    return (
        f"Every finished point is in {args.out}/results.jsonl; run the same command again to go on "
        "(finished points are skipped)."
    )
