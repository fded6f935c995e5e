"""Data-free distillation text: samples the original model generates itself, and mixes of them with a corpus.

After distillation on the novels the held-out novel recovers much more than other domains. Text the
teacher samples from its own distribution covers whatever it knows (code, encyclopaedic prose,
dialogue, ...) without downloading anything: the hypothesis was that the student would then undo
what LP changed rather than imitate one corpus. Measured on the default model (docs/COMPRESS.md), it
did worse than the novels alone on both measuring texts, so `truedepth compress` leaves it off by
default (`--generate-tokens N` turns it on).

Generation is `transformers`' own `generate` (sampling at temperature 1 from the BOS token alone, so
the samples follow the model's unconditional distribution). It is written in parts, one file per
batch, each with its own seed: an interrupted run keeps every finished part and continues with the
next, and the same options give the same text.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ...utils.errors import InputPathError, UserError
from ...utils.io import atomic_write

PART_GLOB = "part-*.txt"
SEPARATOR = "\n\n"


def part_path(folder: Path, index: int) -> Path:
    return folder / f"part-{index:05d}.txt"


def finished_parts(folder: Path) -> list[Path]:
    return sorted(folder.glob(PART_GLOB))


def part_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def generate_batch(model: Any, tokenizer: Any, batch_size: int, length: int, seed: int) -> list[str]:
    """`batch_size` samples of exactly `length` new tokens, started from BOS, at temperature 1 (no top-k/p)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError(
            "the tokenizer has neither a BOS nor an EOS token to start generating from; pass "
            "--data with a training text instead of generated text."
        )
    ids = torch.full((batch_size, 1), start, dtype=torch.long, device=model.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start,
        )
    return tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)


def generate_text(
    model: Any,
    tokenizer: Any,
    folder: Path,
    tokens: int,
    batch_size: int = 64,
    length: int = 256,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write about `tokens` generated tokens to `folder` as parts of `batch_size` samples; resumes finished parts.

    Stops early (keeping what it wrote) when `max_seconds` have passed; returns what it did.
    """
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    per_part = batch_size * length
    total = max(1, -(-tokens // per_part))
    done = len(finished_parts(folder))
    start = time.perf_counter()
    model.eval()
    bar = tqdm(
        total=total * per_part,
        initial=min(done, total) * per_part,
        desc="generate (teacher samples)",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        dynamic_ncols=True,
    )
    stopped_by = None
    try:
        for index in range(done, total):
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                stopped_by = "time"
                break
            samples = generate_batch(model, tokenizer, batch_size, length, part_seed(seed, index))
            atomic_write(part_path(folder, index), SEPARATOR.join(samples) + SEPARATOR)
            bar.update(per_part)
    finally:
        bar.close()
    parts = finished_parts(folder)
    return {
        "parts": len(parts),
        "tokens": len(parts) * per_part,
        "batch_size": batch_size,
        "length": length,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
        "stopped_by": stopped_by,
    }


def read_generated(folder: Path) -> str:
    parts = finished_parts(folder)
    if not parts:
        raise InputPathError(f"{folder} holds no generated text (no {PART_GLOB}); generate it first.")
    return "".join(p.read_text(encoding="utf-8") for p in parts)


def mix_texts(generated: str, corpus: str, corpus_share: float, chunk_chars: int = 2000) -> str:
    """`generated` interleaved with evenly spaced chunks of `corpus`, so that `corpus_share` of the characters
    come from the corpus (0: generated text only). Chunks alternate, so every part of a training epoch
    holds both."""
    if not 0 <= corpus_share < 1:
        raise UserError(f"the corpus share must be in [0, 1) (got {corpus_share}).")
    if corpus_share == 0 or not corpus:
        return generated
    want = int(len(generated) * corpus_share / (1 - corpus_share))
    chunk_chars = min(chunk_chars, len(corpus))
    n = max(1, want // chunk_chars)
    around = corpus + corpus[:chunk_chars]  # a short corpus is used more than once, wrapping around
    corpus_chunks = [around[s : s + chunk_chars] for s in (i * len(corpus) // n for i in range(n))]
    gen_step = max(1, len(generated) // n)
    pieces = []
    for i, chunk in enumerate(corpus_chunks):
        pieces.append(generated[i * gen_step : (i + 1) * gen_step if i < n - 1 else len(generated)])
        pieces.append(SEPARATOR + chunk + SEPARATOR)
    return "".join(pieces)
