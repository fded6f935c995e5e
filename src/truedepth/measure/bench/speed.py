"""A small decode-speed probe for the demo (the full benchmark is `truedepth bench`).

`decode_tokens_per_second` times `model.generate` (greedy, default dynamic cache) on a short
prompt: new tokens / median wall time of `repeats` runs after one warm-up run. The time includes
the prompt's prefill, which for the short default prompt is a few percent of the total.
`interleaved_decode_rates` does the same for several models, taking turns.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ...utils.errors import UserError
from .timing import synchronize

# Ordinary English, repeated until the prompt is long enough; its content does not matter.
PROMPT_TEXT = (
    "The old house stood at the end of the lane, and every evening the family gathered "
    "in the parlour to read letters aloud and talk about the day. "
)


def prompt_ids(tokenizer: Any, prompt_tokens: int) -> torch.Tensor:
    """A (1, prompt_tokens) batch of ordinary text tokens."""
    if prompt_tokens < 1:
        raise UserError(f"prompt_tokens must be at least 1 (got {prompt_tokens}).")
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += list(tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"])
    return torch.tensor([ids[:prompt_tokens]])


@torch.no_grad()
def _timed_generate(model: Any, ids: torch.Tensor, new_tokens: int, pad_id: int) -> float:
    device = ids.device
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS must not cut a run short
        pad_token_id=pad_id,
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new_tokens:  # the rate would be a lie
        # programming error: min_new_tokens makes generate return all tokens
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens instead of {new_tokens}.")
    return seconds


def decode_tokens_per_second(
    model: Any, tokenizer: Any, prompt_tokens: int = 16, new_tokens: int = 32, repeats: int = 3, progress: bool = False
) -> float:
    """Greedy decode speed of `model` at batch 1: new tokens per second (median of `repeats`)."""
    return interleaved_decode_rates({"model": model}, tokenizer, prompt_tokens, new_tokens, repeats, progress)["model"]


def interleaved_decode_rates(
    models: dict[str, Any],
    tokenizer: Any,
    prompt_tokens: int = 16,
    new_tokens: int = 32,
    repeats: int = 3,
    progress: bool = False,
) -> dict[str, float]:
    """Decode tokens/s of several models, timed in turns (round 1 of every model, then round 2, ...).

    Taking turns spreads any slow spell of a shared machine over all models alike, so their
    ratios stay fair even when the absolute numbers suffer.
    """
    if new_tokens < 1 or repeats < 1:
        raise UserError(f"new_tokens and repeats must be at least 1 (got {new_tokens}, {repeats}).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else pad_id
    ids = {name: prompt_ids(tokenizer, prompt_tokens).to(next(m.parameters()).device) for name, m in models.items()}
    for name, model in models.items():
        _timed_generate(model, ids[name], min(new_tokens, 8), pad_id)  # warm-up: allocator, kernels, caches
    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {name: [] for name in models}
    with tqdm(total=repeats * len(models), desc="decode", unit="run", disable=not progress, leave=False) as bar:
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(_timed_generate(model, ids[name], new_tokens, pad_id))
                bar.update()
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}
