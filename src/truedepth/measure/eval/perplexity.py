"""Perplexity of a causal LM on a text, over fixed-length windows.

Two conventions, both over the first ``tokens`` tokens of the text (tokenised once, without
special tokens):

* **disjoint windows** (the default, ``stride = window``): the tokens are cut into consecutive
  windows of ``window`` tokens; inside each window every token but the first is scored, given
  the tokens before it in the same window. A window scores ``window - 1`` tokens.
* **sliding windows** (``stride < window``), the convention of the Hugging Face perplexity guide
  (https://huggingface.co/docs/transformers/perplexity): windows of ``window`` tokens start every
  ``stride`` tokens; the first window scores all its tokens but the first, every later window
  scores only its last ``stride`` tokens (the ones no earlier window scored), with the rest of
  the window as context. More context per scored token, hence a lower perplexity, at about
  ``window / stride`` times the compute.

Only whole windows are evaluated: tokens after the last whole window are dropped (fewer than one
window, or fewer than one stride). ``perplexity = exp(total NLL / scored tokens)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...utils.errors import UserError

# Tokens per forward batch when batch_size is not given: keeps the fp32 logits of a batch
# (batch x window x vocab) near 400 MB for a 49k vocabulary.
AUTO_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class Windows:
    """The windows to evaluate: `ids[k]` is window k, whose last `scored[k]` predictions count."""

    ids: torch.Tensor  # (num_windows, window) token ids
    scored: tuple[int, ...]  # per window: how many of its last tokens are scored
    used_tokens: int  # tokens covered by the windows


def check_window_args(tokens: int | None, window: int, stride: int | None) -> int:
    """Validate the window settings before any work; return the effective stride."""
    if not isinstance(window, int) or window < 2:
        raise UserError(f"window must be an integer of at least 2 tokens (got {window!r}); pass e.g. --window 512.")
    stride = window if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise UserError(
            f"stride must be between 1 and the window ({window}) (got {stride!r}); "
            "omit --stride for disjoint windows, or pass a smaller one, e.g. "
            f"--stride {max(1, window // 2)}."
        )
    if tokens is not None and (not isinstance(tokens, int) or tokens < window):
        raise UserError(
            f"tokens ({tokens!r}) must be at least one window ({window}); "
            f"pass --tokens {window} or more, or a smaller --window."
        )
    return stride


def tokenize(tokenizer: Any, text: str | Sequence[int] | torch.Tensor, tokens: int | None) -> list[int]:
    """Token ids of the first `tokens` tokens of `text` (all if None); ids pass through.

    Only a prefix of a long text is tokenised (growing until it holds enough tokens): a 1 GB file
    costs no more than the tokens asked for. BPE pre-tokenisation splits on words, so the first
    `tokens` ids of a prefix with spare tokens equal those of the whole text.
    """
    if isinstance(text, torch.Tensor):
        return [int(t) for t in text.reshape(-1).tolist()]
    if not isinstance(text, str):
        return [int(t) for t in text]
    if tokenizer is None:
        raise UserError("a tokenizer is needed to score a text string; pass one, or pass token ids.")
    spare = 64
    chars = len(text) if tokens is None else (tokens + spare) * 8
    while True:
        ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if tokens is None or chars >= len(text) or len(ids) >= tokens + spare:
            return ids
        chars *= 4


def make_windows(ids: Sequence[int], tokens: int | None, window: int, stride: int | None = None) -> Windows:
    """Cut `ids` (truncated to `tokens`) into whole windows; see the module docstring."""
    stride = check_window_args(tokens, window, stride)
    text_tokens = len(ids)
    if text_tokens < window:
        raise UserError(
            f"the text has only {text_tokens} tokens, fewer than one window of {window}; "
            "use a longer text or a smaller --window."
        )
    n = text_tokens if tokens is None else min(tokens, text_tokens)
    count = (n - window) // stride + 1
    starts = [k * stride for k in range(count)]
    all_ids = torch.tensor(ids[: starts[-1] + window], dtype=torch.long)
    batch = torch.stack([all_ids[s : s + window] for s in starts])
    # first window: every token after the first; later ones: only the `stride` new tokens
    scored = tuple([window - 1] + [min(stride, window - 1)] * (count - 1))
    return Windows(batch, scored, starts[-1] + window)


def _auto_batch_size(window: int) -> int:
    return max(1, AUTO_BATCH_TOKENS // window)


@torch.no_grad()
def _window_nll(model: Any, ids: torch.Tensor, scored: int) -> torch.Tensor:
    """Summed NLL of the last `scored` tokens of each row of `ids` (shape: batch)."""
    # Only the logits that predict scored tokens are materialised (logits_to_keep): for sliding
    # windows that is `stride + 1` positions instead of `window`.
    keep = scored + 1
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # (B, keep, V)
    targets = ids[:, -scored:]
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    for row in range(ids.shape[0]):  # one row at a time keeps the float32 copy small
        pred = logits[row, :-1].float()
        out[row] = torch.nn.functional.cross_entropy(pred, targets[row], reduction="sum").double()
    return out


def perplexity(
    model: Any,
    tokenizer: Any,
    text: str | Sequence[int] | torch.Tensor,
    tokens: int | None = 8192,
    window: int = 512,
    stride: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on the first `tokens` tokens of `text` (a string or token ids).

    Disjoint windows of `window` tokens by default; `stride < window` gives the sliding-window
    convention of the Hugging Face perplexity guide (module docstring). Windows are batched
    (`batch_size` windows per forward; default: about 2048 tokens per batch). Returns a dict:
    perplexity, nll (mean per scored token, nats), tokens (scored), windows, window, stride,
    used_tokens (text tokens the windows cover).
    """
    stride = check_window_args(tokens, window, stride)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"batch_size must be a positive integer (got {batch_size!r}).")
    wins = make_windows(tokenize(tokenizer, text, tokens), tokens, window, stride)
    device = next(model.parameters()).device
    size = batch_size or _auto_batch_size(window)
    total_tokens = sum(wins.scored)
    nll = 0.0
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()  # dropout would make the number random
    try:
        with tqdm(total=total_tokens, unit="tok", desc="perplexity", disable=not progress, leave=False) as bar:
            # The first window scores more tokens than later sliding ones: batch windows of one count.
            for scored, first, last in _runs(wins.scored):
                for lo in range(first, last, size):
                    hi = min(lo + size, last)
                    nll += float(_window_nll(model, wins.ids[lo:hi].to(device), scored).sum())
                    bar.update(scored * (hi - lo))
    finally:
        model.train(was_training)
    mean = nll / total_tokens
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "windows": len(wins.scored),
        "window": window,
        "stride": stride,
        "used_tokens": wins.used_tokens,
    }


def _runs(values: Sequence[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal consecutive values."""
    runs: list[tuple[int, int, int]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1], i + 1)
        else:
            runs.append((v, i, i + 1))
    return runs
