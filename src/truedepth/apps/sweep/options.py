"""What `truedepth sweep` takes (each option declared once, here or in the groups it is composed of), as the
user writes it; `study.sweep_of` resolves it into a `points.Sweep`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ...core.loading import ModelOptions
from ...measure.eval.evaluate import PerplexityOptions, TaskOptions
from ...utils.options import option, override
from ...utils.shared_options import OutDirOption, ProgressOption, SeedOption

TRANSFORMS = ("parallel", "skip", "shuffle", "merge")


@dataclass
class SweepPoints:
    """Which points: transforms, Δ values and start positions."""

    transforms: str = option("parallel,skip", f"comma list of {', '.join(TRANSFORMS)}.")
    delta: str = option(
        "2:17:2",
        "Δ values (layers transformed): range A:B[:STEP] (end exclusive, as in plans: "
        "2:17:2 is 2, 4, ..., 16) or comma list.",
    )
    start: str = option(
        "end",
        "'end' (range ends at layer L-2, the paper's placement), 'center', or start layers: "
        "range A:B[:STEP] (end exclusive) or comma list (a position scan).",
    )
    no_base: bool = option(False, "do not evaluate the base model")


@dataclass
class SweepOutput:
    """Where the results go, and what is done with them."""

    bench: str | None = option(
        None, "a `truedepth bench --json` file: Pareto plot against measured decode time instead of depth"
    )
    bench_mode: str | None = option(None, "bench mode to read (default: the first in the file)")
    list_plans: bool = option(False, "print the plans and depths, evaluate nothing", flag="--list")
    plot_only: bool = option(False, "redraw tables and plots from OUT/results.jsonl, evaluate nothing")
    report: str | None = option(
        None,
        "also write a Markdown report (tables, computed findings, comparison with the "
        "paper) of everything in OUT to this file",
        metavar="MD",
    )
    report_img: str | None = option(
        None, "folder for the report's PNG plots (default: img/ next to the report)", metavar="DIR"
    )
    report_command: str | None = option(None, argparse.SUPPRESS)  # the command line the report shows (scripts)


@dataclass  # bases in reverse order: --help lists the last base's options first
class SweepOptions(
    ProgressOption, SweepOutput, OutDirOption, TaskOptions, PerplexityOptions, SeedOption, SweepPoints, ModelOptions
):
    """Everything `truedepth sweep` takes (see its --help); the defaults are the command's."""

    out: str = override("runs/sweep", help_note="(results.jsonl, CSV, JSON, plots); rerunning into it resumes.")
    seed: int = override(0, help_note="of the shuffle orders.")
    text: str | None = override("default", default_help="the held-out novel")
    tokens: int = override(8192)
    window: int = override(512)
