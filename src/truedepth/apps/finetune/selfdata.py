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

`source="chat"` is self-distillation on the model's own answers instead: questions built from offline
training material (WordNet words to define or write about, fortunes to explain, MMLU's few-shot
questions; never a measuring text or an MMLU test question) go to the model through its chat template,
and each conversation (the question and the answer it samples) is a training text. Published results
for pruned models trained on their parent's own answers: more of their general ability kept than
with plain fine-tuning.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...utils.errors import InputPathError, UserError
from ...utils.io import atomic_write

PART_GLOB = "part-*.txt"
SEPARATOR = "\n\n"
SOURCES = ("bos", "chat")  # samples from the BOS token; answers to questions in the chat template
CHAT_TEMPERATURE, CHAT_TOP_P = 0.7, 0.9  # answers as a chat user would get them, not temperature-1 drift
CHAT_ANSWER_TOKENS = 256  # at most, per answer (most end earlier, at the end of the assistant's turn)
CHAT_BATCH = 16  # 64 was slower per token on a CPU: the growing KV cache is copied every step


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


# =============================================================================================
# Self-distillation on the model's own answers
# =============================================================================================
_ASK_ABOUT = (
    "Write a short story about {}.",
    "Explain what {} is to a ten-year-old.",
    "Write a short dialogue between two friends about {}.",
    "Give three facts about {}.",
    "Write a short letter to a friend that mentions {}.",
)


@functools.cache
def question_pools() -> dict[str, tuple[str, ...]]:
    """The material questions are made of, each kind once: WordNet entries, short fortunes, MMLU dev questions.

    Raises the fetch command's error when a text is not in the cache."""
    from ...measure.eval.data import fortunes_text
    from ...measure.eval.tasks import MMLU_SUBJECTS, mmlu_splits
    from ...measure.eval.wordnet import wordnet_text

    fortunes = tuple(f.strip() for f in fortunes_text().split(SEPARATOR) if 20 <= len(f.strip()) <= 300)
    # the few-shot questions, less the few that MMLU also asks as test questions (some are repeated): never an
    # MMLU-chat or MMLU test question
    tested = {doc["question"].strip() for subject in MMLU_SUBJECTS for doc in mmlu_splits(subject)[1]}
    mmlu = tuple(
        f"Answer this question about {subject.replace('_', ' ')} and explain your answer.\n\n"
        + doc["question"].strip()
        + "".join(f"\n{k}. {c}" for k, c in zip("ABCD", doc["choices"]))
        for subject in MMLU_SUBJECTS
        for doc in mmlu_splits(subject)[0]
        if doc["question"].strip() not in tested
    )
    return {"wordnet": tuple(wordnet_text().splitlines()), "fortune": fortunes, "mmlu": mmlu}


def chat_question(rng: random.Random, pools: dict[str, tuple[str, ...]]) -> str:
    """One user message: a word to define, a word to write about, a saying to explain or an MMLU question."""
    kind = rng.choice(("define", "write", "fortune", "mmlu"))
    if kind == "fortune":
        return "What does this mean? Explain it in your own words.\n\n" + rng.choice(pools["fortune"])
    if kind == "mmlu":
        return rng.choice(pools["mmlu"])
    words, _, rest = rng.choice(pools["wordnet"]).partition(" (")
    word, part_of_speech = words.split(", ")[0], rest.partition(")")[0]
    if kind == "define":
        return f'What does the {part_of_speech} "{word}" mean? Use it in a sentence.'
    return rng.choice(_ASK_ABOUT).format(word)


def chat_questions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = question_pools()
    return [chat_question(rng, pools) for _ in range(count)]


def check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the model's tokenizer has no chat template, so it cannot be asked questions; generate with "
            "--generate-from bos instead."
        )


def generate_conversations(model: Any, tokenizer: Any, batch_size: int, length: int, seed: int) -> list[str]:
    """`batch_size` conversations: a question (chat_questions) and the answer the model samples to it (at most
    `length` tokens), rendered by the chat template as the model sees a finished exchange."""
    from ...measure.eval.fidelity import greedy_answers, user_turn

    check_chat_template(tokenizer)
    questions = chat_questions(batch_size, seed)
    prompts = [user_turn(tokenizer, q) for q in questions]
    torch.manual_seed(seed)
    answers = greedy_answers(
        model, tokenizer, prompts, length, batch_size, progress=False, temperature=CHAT_TEMPERATURE, top_p=CHAT_TOP_P
    )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}], tokenize=False
        )
        for q, a in zip(questions, answers)
    ]


# =============================================================================================
# Parts on disk
# =============================================================================================
def generate_text(
    model: Any,
    tokenizer: Any,
    folder: Path,
    tokens: int,
    batch_size: int | None = None,
    length: int | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: bool = True,
    source: str = "bos",
) -> dict[str, Any]:
    """Write at least `tokens` generated tokens to `folder` as parts of `batch_size` samples (bos) or
    conversations (chat); resumes after the finished parts.

    Stops early (keeping what it wrote) when `max_seconds` have passed; returns what it did.
    """
    from tqdm.auto import tqdm

    if source not in SOURCES:
        raise UserError(f"unknown generated-text source {source!r}; use one of {', '.join(SOURCES)}.")
    chat = source == "chat"
    if chat:
        check_chat_template(tokenizer)
        batch_size, length = batch_size or CHAT_BATCH, length or CHAT_ANSWER_TOKENS
    else:
        batch_size, length = batch_size or 64, length or 256
    make: Callable[[int], list[str]] = functools.partial(
        generate_conversations if chat else generate_batch, model, tokenizer, batch_size, length
    )
    count: Callable[[str], int] = (  # a BOS part is exactly batch x length tokens; chat is counted as read back
        (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        if chat
        else (lambda _: batch_size * length)
    )
    folder.mkdir(parents=True, exist_ok=True)
    done = finished_parts(folder)
    written, index = sum(count(p.read_text(encoding="utf-8")) for p in done), len(done)
    start = time.perf_counter()
    model.eval()
    bar = tqdm(
        total=max(tokens, written),
        initial=written,
        desc=f"generate ({'own answers' if chat else 'teacher samples'})",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        dynamic_ncols=True,
    )
    stopped_by = None
    try:
        while written < tokens:
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                stopped_by = "time"
                break
            text = SEPARATOR.join(make(part_seed(seed, index))) + SEPARATOR
            atomic_write(part_path(folder, index), text)
            new = count(text)
            written, index = written + new, index + 1
            bar.update(min(new, max(0, tokens - bar.n)))
    finally:
        bar.close()
    return {
        "source": source,
        "parts": len(finished_parts(folder)),
        "tokens": written,
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
