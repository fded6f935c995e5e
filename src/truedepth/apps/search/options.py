"""`truedepth search`'s options, each declared once (their --help is built from them), in groups; the
calibration group is shared with `truedepth compress`."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.loading import ModelOptions
from ...utils.options import option, override
from ...utils.shared_options import PlotFileOption, QuietOption, ThreadsOption
from .scoring import OBJECTIVES


@dataclass
class SearchTarget:
    group_title = "target (exactly one)"
    target_depth: str | None = option(
        None, "depth(s) to reach: 26, a list 28,26,24 or a range 22:29 (end exclusive: 22..28)", metavar="D"
    )
    reduce: str | None = option(
        None, "layers of depth to remove instead: 4, a list or a range 2:9 (end exclusive: 2..8)", metavar="K"
    )


@dataclass
class SearchSpace:
    group_title = "search space and objective"
    objective: str = option(
        "ppl", "ppl: calibration perplexity; kl: KL divergence from the original model.", choices=OBJECTIVES
    )
    max_group: int = option(3, "largest group of consecutive layers run in parallel.", choices=(2, 3))
    allow_skip: bool = option(False, "also allow dropping single layers")
    calib: str = option(
        "austen-train",
        "calibration text: 'austen-train' (five novels, not the held-out one), "
        "'other-domain', 'austen:<name>', a file, or a datasets name.",
        metavar="TEXT",
    )
    finalists: int = option(6, "plans per depth re-scored on the --select-windows.", metavar="F")


@dataclass
class CalibrationOptions:
    """How plans are scored: the calibration windows and the dtype (`truedepth compress` shares these)."""

    group_title = "calibration"
    calib_windows: int = option(16, "calibration windows.", metavar="N")
    calib_length: int = option(512, "tokens per window.", metavar="T")
    select_windows: int = option(
        48,
        "more calibration windows, never seen by the search, that make the final choice "
        "among the --finalists best plans of each depth (0: keep the search's own pick).",
        metavar="N",
    )
    search_dtype: str | None = option(
        None,
        "dtype of the copy the search scores plans with (e.g. bf16: ~2-3x faster "
        "on CPUs with AMX, rankings within ~0.1%; slower on some CPUs with avx512_bf16 "
        "alone); 'auto': bf16 where a fraction of a second of timing finds it 1.2x "
        "faster than fp32. Held-out numbers still use --dtype. Default: the model's "
        "dtype, no copy",
        metavar="DTYPE",
    )


@dataclass
class SearchAlgorithm:
    group_title = "algorithm and cost"
    beam: int = option(2, "plans kept per depth level.", metavar="B")
    shortlist: int = option(6, "cheapest candidates tried per plan and step.", metavar="M")
    refine_rounds: int = option(1, "rounds of local swaps.", metavar="R")
    screen: int | None = option(
        None, "measure alone only the N candidates with the best cosine proxy (default: all)", metavar="N"
    )
    budget: int | None = option(
        None,
        "soft cap on full-plan evaluations after the proxies; when reached, each depth "
        "level still gets one evaluation so the target is reached (default: no cap)",
        metavar="N",
    )


@dataclass
class SearchOutput:
    group_title = "comparison and output"
    baseline: bool = option(
        False, "also find the best single contiguous range of pairs for each depth (the paper's scheme)"
    )
    report: str = option(
        "default",
        "text to report held-out perplexity of the final plans on, with the fused model: "
        "'default' (held-out novel), a file, ... or 'none'. Each plan is fused on a copy of the model, "
        "so this needs room for two copies: for a large model pass 'none' and run `truedepth eval "
        "--plan` on the plans afterwards.",
        metavar="TEXT",
    )
    report_tokens: int = option(8192, "held-out tokens.", metavar="N")
    report_window: int = option(512, "held-out window.", metavar="T")
    out: str | None = option(None, "write the plans, objectives and counts as JSON to this file", metavar="FILE")


@dataclass
class SearchOptions(
    QuietOption,
    ThreadsOption,
    PlotFileOption,
    SearchOutput,
    SearchAlgorithm,
    CalibrationOptions,
    SearchSpace,
    SearchTarget,
    ModelOptions,
):
    """Everything `truedepth search` takes (see its --help; the options come in the order of the bases from the
    last); the defaults are the command's."""

    plot: str | None = override(None, help_note="(the objective against depth)")
    command: str = "truedepth search"  # the command line, recorded in the summary (not an option)
