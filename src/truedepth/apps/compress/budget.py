"""`truedepth compress`'s time budget: each stage's share of --budget-minutes, the least time the search and
one training step take (their matmul flops at the device's measured speed), and the check that a budget
leaves the fine-tune at least one step."""

from __future__ import annotations

import math
from typing import Any

from ...core.arch import layer_widths
from ...utils.errors import UserError
from ..search import SearchOptions, candidate_elements
from .options import STAGES, CompressOptions

# Planned share of --budget-minutes per stage. The search cannot stop half-way (its cost is set by the
# model and the calibration options); generation stops at its share. The fine-tune gets what is left
# once the evaluation's share is set aside, and fits its schedule to that time (finetune's
# --max-minutes with the tokens fitted to it); the evaluation (four models on two texts) keeps its share.
BUDGET_SHARES = {"search": 0.20, "generate": 0.10, "finetune": 0.50, "evaluate": 0.20, "save": 0.0, "serve": 0.0}

# The budget curve (docs/COMPRESS.md, "What a budget buys"): the default model's searched depth-24 plan
# fine-tuned with compress's training text and loss on this many tokens, then perplexity as a multiple of the base
# model's on the first 32,768 tokens of the held-out novel and of the other-domain text (2026-12-05). 0 tokens:
# the searched plan untrained; up to 393,216: `finetune` alone (batch 2 x 256); the last two: whole `compress`
# runs with --budget-minutes 30 and 60 on the machine of CURVE_TOKENS_PER_SECOND.
BUDGET_CURVE = (  # (fine-tuning tokens, held-out, other domain)
    (0, 1.329, 1.426),
    (49_152, 1.088, 1.200),
    (98_304, 1.061, 1.172),
    (196_608, 1.047, 1.151),
    (393_216, 1.027, 1.132),
    (580_608, 1.021, 1.120),
    (1_347_584, 1.009, 1.101),
)
CURVE_TOKENS_PER_SECOND = 525  # compress's fine-tune over the 60-minute run (2-core Xeon with AMX, batch 4 x 256, bf16)
SEARCH_OVER_FLOOR = 4.3  # the whole search took 2.0 (bf16) to 4.3 (fp32) times its least time (docs/COMPRESS.md)


def layer_and_head_weights(config: Any) -> tuple[int, int]:
    """Matrix weights one token passes through in one decoder layer (of an original model: all alike), and in
    the output head."""
    per_layer = layer_widths(config)[0].matrix_weights(config.hidden_size)
    return per_layer, config.hidden_size * config.vocab_size


def weight_count(config: Any) -> int:
    """Matrix weights one token passes through (decoder layers and the output head), from the config."""
    head = config.hidden_size * config.vocab_size
    return sum(w.matrix_weights(config.hidden_size) for w in layer_widths(config)) + head


def search_floor_flops(config: Any, opts: CompressOptions) -> float:
    """Matmul flops the search stage cannot do without, whatever the beam finds: the original model on
    the calibration and the selection windows, every candidate group scored alone (from its first layer
    to the output head: the layers before it are recorded once) and one finalist on the selection
    windows. The beam and the refinement, most of the search, come on top."""
    per_layer, head = layer_and_head_weights(config)
    layers = config.num_hidden_layers
    whole = layers * per_layer + head
    alone = sum(
        (layers - e.start) * per_layer + head
        for e in candidate_elements(layers, SearchOptions.max_group, SearchOptions.allow_skip)
    )
    calib, select = opts.calib_windows * opts.calib_length, opts.select_windows * opts.calib_length
    return 2 * (calib * (whole + alone) + select * 2 * whole)


def least_seconds(config: Any, opts: CompressOptions) -> tuple[float, float, str]:
    """Lower bounds of the search stage's time and of one fine-tuning step's, and the device: their flops at
    the matmul speed measured on the device (a fraction of a second) in the dtypes they will run in. A real
    step (backward pass, teacher) costs about three times more; the whole search on the default model took 2.0
    (bf16) and 4.3 (fp32) times its floor on a 2-core Intel Xeon VM (docs/COMPRESS.md)."""
    from ...measure.bench import timing
    from ...measure.bench.precision import scoring_dtype, training_precision

    device, model_dtype, train_dtype = training_precision(opts.device, opts.dtype, opts.train_dtype)
    search_dtype = scoring_dtype(opts.search_dtype, model_dtype, device)
    step = 2 * weight_count(config) * opts.batch_size * opts.seq_len / timing.matmul_flops(device, train_dtype)
    return search_floor_flops(config, opts) / timing.matmul_flops(device, search_dtype), step, device


def check_budget(opts: CompressOptions, config: Any, searched: bool) -> None:
    """Refuse a budget whose fine-tuning time, after the least time the search can take, is shorter than one
    training step: the search cannot stop half-way, so it would run on and leave the fine-tune nothing."""
    search, step, device = least_seconds(config, opts)
    search = 0.0 if searched else search
    finetune_end = sum(BUDGET_SHARES[s] for s in STAGES[: STAGES.index("finetune") + 1])
    left = opts.budget_minutes * 60 * finetune_end - search
    if left < step:
        need = math.ceil((search + step) / (60 * finetune_end) * 10) / 10  # up: a budget that passes
        after = (
            f" after the search's least time ({search / 60:.2g} min; the whole search takes several times that)"
            if search
            else ""
        )
        raise UserError(
            f"--budget-minutes {opts.budget_minutes:g} leaves {max(left, 0):.3g} s for fine-tuning"
            f"{after}, less than one training step (about {step:.3g} s or more on {device}); "
            f"pass --budget-minutes {need:g} or more."
        )


def expected_quality(opts: CompressOptions, config: Any) -> str:
    """What the budget can be expected to reach, from the budget curve: the fine-tune's minutes once the search
    has taken its usual time, the tokens they hold on the curve's machine, read off the curve. The curve's
    machine, not this one: a step's real cost is not predictable from matmul speed alone."""
    search, _, _ = least_seconds(config, opts)
    finetune_end = sum(BUDGET_SHARES[s] for s in STAGES[: STAGES.index("finetune") + 1])
    minutes = max(0.0, opts.budget_minutes * finetune_end - SEARCH_OVER_FLOOR * search / 60)
    tokens = int(minutes * 60 * CURVE_TOKENS_PER_SECOND)
    held, other = curve_at(tokens)
    most = BUDGET_CURVE[-1][0]
    beyond = f"; the curve ends at {most:,} tokens, more is not measured" if tokens > most else ""
    return (
        f"expected: --budget-minutes {opts.budget_minutes:g} leaves about {minutes:.0f} min of fine-tuning after the "
        f"search, about {tokens:,} tokens on the 2-core CPU the budget curve was measured on "
        f"({CURVE_TOKENS_PER_SECOND} tokens/s; faster hardware trains more); on the default model at depth 24 that "
        f"reached held-out {held:.3f}x and other domain {other:.3f}x the base model's perplexity{beyond} (other "
        "models and depths differ: docs/COMPRESS.md)"
    )


def curve_at(tokens: int) -> tuple[float, float]:
    """(held-out, other domain) of the budget curve at `tokens`, linear between its points (the last beyond it)."""
    import numpy as np

    xs, held, other = zip(*BUDGET_CURVE)
    return float(np.interp(tokens, xs, held)), float(np.interp(tokens, xs, other))


def stage_seconds_left(opts: CompressOptions, records: dict[str, dict], stage: str) -> float:
    """Seconds a stage that stops by time may use: the budget up to the end of its share, less what the
    earlier stages used (so a fast search leaves its rest to generation and fine-tuning)."""
    end = sum(BUDGET_SHARES[s] for s in STAGES[: STAGES.index(stage) + 1])
    used = sum(r["seconds"] for r in records.values())
    return max(opts.budget_minutes * 60 * end - used, 0.06)  # a slow search: still one step
