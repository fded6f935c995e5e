"""`truedepth compress` end to end: check, then run or skip each stage in order (with the budget's clock), then
write the report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ...utils.env import use_threads
from .budget import BUDGET_SHARES, expected_quality, stage_seconds_left
from .checks import check_inputs
from .options import STAGE_DIR, STAGES, SUMMARY_FILE, CompressOptions
from .report import show_report, write_report
from .stages import (
    check_unchanged,
    finished_stage,
    run_evaluate_stage,
    run_finetune_stage,
    run_generate_stage,
    run_save_stage,
    run_search_stage,
    run_serve_stage,
    stage_path,
    write_stage,
)


def prepare_folder(out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    (out / STAGE_DIR).mkdir(parents=True, exist_ok=True)


def run_compress(opts: CompressOptions) -> dict[str, Any]:
    """Run (or resume) every stage as `opts` says; returns compress.json's content."""
    use_threads(opts.threads)  # before the checks: the budget check times matmuls
    config, device = check_inputs(opts)
    layers = config.num_hidden_layers
    out = Path(opts.out)
    if not opts.overwrite:
        check_unchanged(out, opts)
    print(expected_quality(opts, config))
    prepare_folder(out, opts.overwrite)
    records: dict[str, dict[str, Any]] = {}
    clock = Clock(opts.budget_minutes)
    ran = False
    for i, stage in enumerate(STAGES, 1):
        done = finished_stage(out, stage, opts)
        if done is not None:
            print(
                f"[{i}/{len(STAGES)}] {stage}: finished earlier with the same options "
                f"({stage_path(out, stage)}), skipped"
            )
            records[stage] = done
            clock.spent(done["seconds"])
            continue
        print(clock.header(i, stage))
        ran = True
        start = time.perf_counter()
        result = _run_stage(stage, opts, out, layers, records)
        records[stage] = write_stage(out, stage, opts, time.perf_counter() - start, result)
        clock.spent(records[stage]["seconds"])
        print(f"[{i}/{len(STAGES)}] {stage}: done in {records[stage]['seconds'] / 60:.1f} min")
    if not ran and (out / SUMMARY_FILE).is_file():  # nothing new: the report stands
        return show_report(out)
    return write_report(out, opts, records, device)


def _run_stage(stage: str, opts: CompressOptions, out: Path, layers: int, records: dict[str, dict]) -> dict:
    if stage == "search":
        return run_search_stage(opts)
    if stage == "generate":
        return run_generate_stage(opts, out, stage_seconds_left(opts, records, stage))
    plan = records["search"]["result"]["plan_string"]
    if stage == "finetune":
        return run_finetune_stage(opts, out, plan, stage_seconds_left(opts, records, stage) / 60)
    if stage == "evaluate":
        return run_evaluate_stage(opts, out, layers, plan)
    if stage == "save":
        return run_save_stage(out)
    return run_serve_stage(opts, out)


class Clock:
    """Budget bookkeeping for the stage headers: planned minutes, time spent, ETA of the whole run."""

    def __init__(self, budget_minutes: float) -> None:
        self.budget = budget_minutes * 60
        self.used = 0.0

    def spent(self, seconds: float) -> None:
        self.used += seconds

    def header(self, index: int, stage: str) -> str:
        planned = self.budget * BUDGET_SHARES[stage]
        left = max(self.budget - self.used, 0)
        return (
            f"[{index}/{len(STAGES)}] {stage}: planned {planned / 60:.1f} min "
            f"({BUDGET_SHARES[stage]:.0%} of --budget-minutes {self.budget / 60:g}); "
            f"{self.used / 60:.1f} min spent so far, {left / 60:.1f} min of the budget left"
        )
