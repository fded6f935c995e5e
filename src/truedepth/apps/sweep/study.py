"""Running a sweep end to end: resolve and check the settings, measure what is missing, write tables, plots and
report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...core.plan import parse_int_ranges
from ...utils.errors import InputPathError, check_output_dir
from .options import SweepOptions
from .points import Point, Sweep, parse_transforms, run_sweep, text_ids
from .report import finish
from .tables import read_bench


def sweep_of(opts: SweepOptions) -> Sweep:
    """The settings `opts` gives, resolved: transforms and Δ values parsed, dtype and device chosen."""
    from ...measure.eval.evaluate import task_list
    from ...utils.device import device_and_dtype

    device, dtype = device_and_dtype(opts.device, opts.dtype)
    return Sweep(
        out=Path(opts.out),
        transforms=parse_transforms(opts.transforms),
        deltas=parse_int_ranges(opts.delta, "--delta", was_inclusive=True),
        start=opts.start,
        seed=opts.seed,
        tasks=task_list(opts.tasks),
        num_fewshot=opts.num_fewshot,
        limit=opts.limit,
        text=opts.text,
        tokens=opts.tokens,
        window=opts.window,
        stride=opts.stride,
        model=opts.model,
        dtype=dtype,
        device=device,
        bench=Path(opts.bench) if opts.bench else None,
        bench_mode=opts.bench_mode,
        progress=not opts.no_progress,
    )


def check_sweep(sweep: Sweep, tasks: bool = True) -> None:
    """Reject bad settings before anything is loaded (`tasks`: also the task names, which takes seconds)."""
    from ...measure.eval.evaluate import check_task_options
    from ...measure.eval.perplexity import check_window_args

    check_window_args(sweep.tokens, sweep.window, sweep.stride)
    check_output_dir(sweep.out, "--out")
    check_task_options(sweep.tasks, sweep.num_fewshot, sweep.limit)
    if sweep.bench is not None:
        if not sweep.bench.is_file():
            raise InputPathError(
                f"--bench {sweep.bench}: no such file; write it with `truedepth bench --json {sweep.bench}`."
            )
        read_bench(sweep.bench, sweep.bench_mode)  # a bad bench file fails now, not after the sweep
    if tasks and sweep.tasks:
        from ...measure.eval.icl import check_tasks, task_manager

        check_tasks(sweep.tasks, task_manager(sweep.tasks))  # unknown task names fail before any work


def run_study(
    sweep: Sweep,
    points: Sequence[Point],
    notes: Sequence[str] = (),
    plot_only: bool = False,
    report: Path | None = None,
    report_img: Path | None = None,
    report_command: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every point not yet in OUT/results.jsonl (unless `plot_only`), then write tables,
    plots and (with `report`) the Markdown report; returns the table rows."""
    check_sweep(sweep)
    if not plot_only:
        ids = text_ids(sweep)
        from ...core.loading import load_for_device

        model, tokenizer = load_for_device(sweep.model, dtype=sweep.dtype, device=sweep.device)
        run_sweep(sweep, model, tokenizer, points, ids)
    return finish(sweep, notes, report, report_img, report_command)
