"""A search end to end (`truedepth search`): check the options, load, search, choose, report, save."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from ...core.plan import Plan, parse_int_ranges
from ...measure.bench.precision import check_search_dtype, scoring_dtype
from ...utils.env import use_threads
from ...utils.errors import UserError, check_output_file
from ...utils.io import atomic_write_json
from .beam import Options, contiguous_baseline, search, select_on_fresh_windows
from .options import SearchOptions
from .report import held_out_perplexity, plot, print_summary, report_held_out
from .scoring import PlanScorer, split_calibration_ids
from .space import target_reductions


def check_args(args: SearchOptions) -> tuple[list[int] | None, list[int] | None]:
    """Validate everything that does not need the model, before loading it."""
    check_output_file(args.out, "--out")
    check_output_file(args.plot, "--plot")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {args.threads}).")
    if (args.target_depth is None) == (args.reduce is None):
        raise UserError("give exactly one of --target-depth D (e.g. --target-depth 26) or --reduce K.")
    depths = parse_int_ranges(args.target_depth, "--target-depth") if args.target_depth is not None else None
    reduce = parse_int_ranges(args.reduce, "--reduce") if args.reduce is not None else None
    for name in ("beam", "shortlist", "calib_windows", "report_tokens", "finalists"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    for name in ("refine_rounds", "select_windows"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(args, name)}).")
    if args.calib_length < 2:
        raise UserError(f"--calib-length must be at least 2 tokens (got {args.calib_length}).")
    if args.screen is not None and args.screen < 1:
        raise UserError(f"--screen must be at least 1 (got {args.screen}); omit it to measure every candidate.")
    if args.budget is not None and args.budget < 1:
        raise UserError(f"--budget must be at least 1 (got {args.budget}); omit it for no cap.")
    if args.report != "none" and args.report_tokens < args.report_window:
        raise UserError(
            f"--report-tokens ({args.report_tokens}) must be at least one --report-window ({args.report_window})."
        )
    check_search_dtype(args.search_dtype)
    if args.report != "none" and args.report == args.calib:
        raise UserError(
            f"--report and --calib are the same text ({args.calib!r}); report on text the search "
            "did not see, e.g. --report default (the held-out novel)."
        )
    return depths, reduce


def run_search(args: SearchOptions) -> dict[str, Any]:
    """Search, choose, report and save as `args` says; returns the summary (also written to `args.out`)."""
    depths, reduce = check_args(args)
    from ...core.arch import decoder_layers
    from ...core.loading import load_for_device
    from ...measure.eval.data import load_text

    use_threads(args.threads)
    progress = not args.quiet
    calib_text = load_text(args.calib)
    report_text = load_text(args.report) if args.report != "none" else None
    model, tokenizer = load_for_device(args.model, dtype=args.dtype, device=args.device)
    L = len(decoder_layers(model))
    reductions = target_reductions(L, depths, reduce, args.max_group, args.allow_skip)
    ids, select_ids = split_calibration_ids(
        tokenizer, calib_text, args.calib_windows, args.select_windows, args.calib_length
    )
    opt = Options(
        args.max_group,
        args.allow_skip,
        args.beam,
        args.shortlist,
        args.refine_rounds,
        args.screen,
        args.budget,
        progress,
    )
    t0 = time.perf_counter()
    scoring_model = search_copy(model, args.search_dtype)
    scorer = PlanScorer(scoring_model, ids, args.objective)
    score_dtype = str(next(scoring_model.parameters()).dtype).removeprefix("torch.")
    print(
        f"{args.model}: {L} layers; calibration {tuple(ids.shape)} tokens of {args.calib!r} "
        f"(+ {args.select_windows} fresh windows for the final choice); "
        f"objective {args.objective} scored in {score_dtype}, original model {scorer.base:.4f}"
    )
    result = search(scorer, reductions, opt)
    summary = {
        "model": args.model,
        "command": args.command,
        "calibration": {
            "text": args.calib,
            "windows": args.calib_windows,
            "length": args.calib_length,
            "select_windows": args.select_windows,
            "finalists": args.finalists,
            "dtype": str(next(scorer.model.parameters()).dtype),
        },
        "options": vars(opt) | {"objective": args.objective},
        **result.to_dict(),
    }
    summary["search_seconds"] = round(time.perf_counter() - t0, 2)
    save = _saver(args.out)
    save(summary)  # each stage is saved as it ends: a long run that stops later keeps its plans
    if args.baseline:  # before the final choice, so the contiguous ranges are among its finalists
        base = contiguous_baseline(scorer, reductions, progress)
        summary["baseline"] = [base[k] for k in sorted(base)]
        save(summary)
    if select_ids is not None:
        t1 = time.perf_counter()
        selector = PlanScorer(scoring_model, select_ids, args.objective)
        select_on_fresh_windows(scorer, selector, result.found, args.finalists, progress)
        summary["found"] = result.to_dict()["found"]
        for row in summary.get("baseline", []):
            row["selection_objective"] = selector.score(Plan.from_dict(row["plan"]))
        summary["selection_base_objective"] = selector.base
        summary["selection_seconds"] = round(time.perf_counter() - t1, 2)
        save(summary)
    if report_text is not None:
        summary["report"] = {"text": args.report, "tokens": args.report_tokens, "window": args.report_window}
        rows = summary["found"] + summary.get("baseline", [])
        report_held_out(model, tokenizer, rows, report_text, args.report_tokens, args.report_window, progress)
        summary["base_heldout_ppl"] = held_out_perplexity(
            model, tokenizer, Plan(()), report_text, args.report_tokens, args.report_window
        )
    print_summary(summary)
    save(summary)
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        plot(summary, args.plot)
        print(f"wrote {args.plot}")
    return summary


def search_copy(model: Any, dtype: Any) -> Any:
    """The model the search scores plans with: `model` itself, or a copy cast to `dtype`. "auto": a bf16
    copy of an fp32 model where bf16 is clearly faster on its device (rankings move by ~0.1 %, SEARCH.md)."""
    param = next(model.parameters())
    dtype = scoring_dtype(dtype, param.dtype, str(param.device))
    if dtype == param.dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _saver(path: str | None) -> Callable[[dict], None]:
    def save(summary: dict) -> None:
        if path:
            atomic_write_json(path, summary)

    return save
