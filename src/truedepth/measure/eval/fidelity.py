"""How close a model (a compressed one, usually) stays to a reference model (its base), as its users feel it.

Perplexity is one number about the text; these are about the reference model's behaviour:

* **top-1 agreement**: the share of scored positions where both models' most likely next token (arg-max of
  the logits) is the same: what greedy decoding would pick.
* **KL divergence** ``KL(reference || model)`` per scored token, in nats: how much of the reference's
  next-token distribution the model loses, over all tokens, not only the right one.
* **MMLU-chat choice agreement**: MMLU questions asked through the tokenizer's chat template ("answer with
  the letter"), a few tokens decoded greedily by each model, the chosen letter parsed from the answer; how
  often the model picks the reference's letter, and each one's accuracy against the key.

The text metrics use the windows of :mod:`.perplexity` (the same tokens, windows and scored positions as
its perplexity, which they report for both models as well) and hold the logits of one batch per model at a
time (one window of 512 tokens or more, or shorter ones making 512 tokens), never the whole text's.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...utils.errors import UserError
from ...utils.options import option
from .perplexity import _runs, check_window_args, make_windows, tokenize

MMLU_CHAT_SEED = 1234  # which questions --mmlu-chat N asks: the first N of all test questions shuffled with it
MMLU_CHAT_NEW_TOKENS = 8  # the letter comes first in nearly every answer of the default model
MMLU_CHAT_BATCH = 8  # prompts per generate call (sorted by length: little padding)
_LETTERS = "ABCD"
# Tokens per forward pass of each model when batch_size is not given: one window of 512 tokens or more (the
# logits of a window are window x vocabulary floats: 100 MB for a 49k vocabulary), many short ones.
AUTO_BATCH_TOKENS = 512
_POSITIONS_PER_CHUNK = 256  # KL over this many positions at a time: a few float32 copies of chunk x vocab


@dataclass
class MmluChatOption:
    group_title = "fidelity to a reference model"
    mmlu_chat: int = option(
        0,
        "ask N MMLU questions through the tokenizer's chat template (answer with the letter), decode a "
        "few tokens greedily with the model and with its reference (eval: --against), and report how often "
        "the chosen letters agree and each one's accuracy; 0: none.",
        metavar="N",
    )


@dataclass
class AgainstOption:
    group_title = MmluChatOption.group_title
    against: str | None = option(
        None,
        "compare with a reference on the same windows of --text: 'base' (--model without --plan), another "
        "plan of --model (e.g. parallel=24:28), or a model folder or hub id with the same tokenizer; adds "
        "top-1 agreement with the reference's next token, KL(reference || model) per token and the "
        "reference's perplexity.",
        metavar="base|PLAN|MODEL",
    )


@dataclass
class FidelityOptions(MmluChatOption, AgainstOption):
    """What `eval` compares the model with, and how (--against first in --help)."""


# =============================================================================================
# Top-1 agreement and KL divergence on a text
# =============================================================================================
@torch.no_grad()
def _window_stats(reference: Any, model: Any, ids: torch.Tensor, scored: int) -> tuple[int, float, float, float]:
    """Over the last `scored` predictions of every row of `ids`: positions where the arg-maxes agree, summed
    KL(reference || model), summed NLL of the reference and of the model (sums in float64)."""
    keep = scored + 1  # the logits that predict the scored tokens, as perplexity's _window_nll keeps them
    ref_logits = reference(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, :-1]
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, :-1]
    targets = ids[:, -scored:]
    agree, kl, ref_nll, nll = 0, 0.0, 0.0, 0.0
    for row in range(ids.shape[0]):
        for lo in range(0, scored, _POSITIONS_PER_CHUNK):
            hi = min(lo + _POSITIONS_PER_CHUNK, scored)
            p_log = torch.log_softmax(ref_logits[row, lo:hi].float(), dim=-1)
            q_log = torch.log_softmax(logits[row, lo:hi].float(), dim=-1)
            target = targets[row, lo:hi, None]
            agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
            kl += float((p_log.exp() * (p_log - q_log)).sum(-1).double().sum())
            ref_nll -= float(p_log.gather(-1, target).double().sum())
            nll -= float(q_log.gather(-1, target).double().sum())
    return agree, kl, ref_nll, nll


def fidelity(
    reference: Any,
    model: Any,
    tokenizer: Any,
    text: str | Sequence[int] | torch.Tensor,
    tokens: int | None = 8192,
    window: int = 512,
    stride: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 agreement of `model` with `reference`, mean KL(reference || model) and both perplexities, on the
    windows `perplexity(model, tokenizer, text, tokens, window, stride)` scores (the two models share the
    tokenizer). `batch_size` windows per forward pass of each model (default: one window of 512 tokens or
    more, as many shorter ones as make 512 tokens; the logits of one batch per model are what is held).
    Returns: top1_agreement, kl (nats per scored token), perplexity, nll, reference_perplexity, reference_nll,
    tokens (scored), windows, window, stride, used_tokens."""
    stride = check_window_args(tokens, window, stride)
    batch_size = max(1, AUTO_BATCH_TOKENS // window) if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer (got {batch_size!r}).")
    wins = make_windows(tokenize(tokenizer, text, tokens), tokens, window, stride)
    device = next(model.parameters()).device
    total = sum(wins.scored)
    agree, kl, ref_nll, nll = 0, 0.0, 0.0, 0.0
    from tqdm.auto import tqdm

    modes = (reference.training, model.training)
    reference.eval()
    model.eval()
    try:
        with tqdm(total=total, unit="tok", desc="fidelity", disable=not progress, leave=False) as bar:
            for scored, first, last in _runs(wins.scored):  # batches of windows that score alike
                for lo in range(first, last, batch_size):
                    hi = min(lo + batch_size, last)
                    a, k, r, n = _window_stats(reference, model, wins.ids[lo:hi].to(device), scored)
                    agree, kl, ref_nll, nll = agree + a, kl + k, ref_nll + r, nll + n
                    bar.update(scored * (hi - lo))
    finally:
        reference.train(modes[0])
        model.train(modes[1])
    return {
        "top1_agreement": agree / total,
        "kl": kl / total,
        "perplexity": math.exp(nll / total),
        "nll": nll / total,
        "reference_perplexity": math.exp(ref_nll / total),
        "reference_nll": ref_nll / total,
        "tokens": total,
        "windows": len(wins.scored),
        "window": window,
        "stride": stride,
        "used_tokens": wins.used_tokens,
    }


# =============================================================================================
# What --against names
# =============================================================================================
def reference_source(against: str, model: str, plan: str | None) -> tuple[str, str | None]:
    """(model, plan) of the reference `against` names: 'base' is `model` without `plan`, a plan string is
    `model` with that plan, anything else a model (folder or hub id). Checks the reference against its
    config.json and the model's vocabulary: no weights are read."""
    from ...core.loading import check_model_and_plan, read_config
    from ...core.plan import as_plan

    spec = (against or "").strip()
    if not spec:
        raise UserError("--against is empty; pass 'base', a plan (e.g. parallel=24:28) or a model folder.")
    if spec == "base":
        if as_plan(plan).is_identity:
            raise UserError(
                "--against base compares with --model without its --plan, but no --plan is given: the model would "
                "be compared with itself. Pass --plan, or for a saved compressed model --against ORIGINAL_MODEL."
            )
        source: tuple[str, str | None] = (model, None)
    elif "=" in spec.split(",")[0] and not _is_local(spec):  # plan steps are kind=range
        source = (model, str(as_plan(spec)))
    else:
        source = (spec, None)
    ref_config = check_model_and_plan(*source)
    vocab, ref_vocab = read_config(model).vocab_size, ref_config.vocab_size
    if vocab != ref_vocab:
        raise UserError(
            f"--against {spec}: its vocabulary has {ref_vocab} tokens, the model's {vocab}; compare models "
            "that share a tokenizer."
        )
    return source


def _is_local(spec: str) -> bool:
    from pathlib import Path

    return Path(spec).expanduser().exists()


# =============================================================================================
# MMLU through the chat template
# =============================================================================================
def mmlu_chat_questions(count: int, seed: int = MMLU_CHAT_SEED) -> list[dict]:
    """`count` MMLU test questions (the truedepth_mmlu docs: question, subject, choices, answer index), drawn
    from all subjects with a fixed seed; the same questions for every model."""
    from .tasks import MMLU_SUBJECTS, mmlu_splits

    docs = [doc for subject in MMLU_SUBJECTS for doc in mmlu_splits(subject)[1]]
    if not 1 <= count <= len(docs):
        raise UserError(f"--mmlu-chat must be between 1 and {len(docs)} questions (got {count}).")
    return random.Random(seed).sample(docs, count)


def mmlu_chat_prompt(tokenizer: Any, doc: dict) -> str:
    """The question as a user message in the tokenizer's chat template, asking for the letter only (a plain
    'Answer:' prompt for a tokenizer without a template)."""
    subject = doc["subject"].replace("_", " ")
    body = doc["question"].strip() + "\n" + "\n".join(f"{k}. {c}" for k, c in zip(_LETTERS, doc["choices"]))
    ask = (
        f"The following is a multiple choice question about {subject}. Answer with the letter of the correct "
        f"choice (A, B, C or D) only.\n\n{body}"
    )
    if not getattr(tokenizer, "chat_template", None):
        return ask + "\nAnswer:"
    return user_turn(tokenizer, ask)


def user_turn(tokenizer: Any, text: str) -> str:
    """`text` as a user message in the tokenizer's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


# "B", "B.", "(B)", "B) text", "**C**: text", "D 5"; not "A cat" (the article)
_LEADING = re.compile(r"^[\s*(\[]*(?:([ABCD])(?:[).:\]*]|\s*$)|([BCD])\s)")
_NAMED = re.compile(r"\b(?i:answer|option|choice)\s*(?:is|would be)?\s*:?\s*\(?([ABCD])\b")  # "the answer is C"
_LONE = re.compile(r"(?<![A-Za-z])\(?([ABCD])(?:\)|[.:](?!\w)|\s*$)")  # a letter set apart: "... is B."


def parse_choice(answer: str, choices: Sequence[str] = ()) -> str | None:
    """The letter (A-D) an answer picks, or None. In order: a letter that opens the answer, one named as the
    answer ('the answer is C'), one set apart by punctuation ('... is B.'), and else the one choice whose
    text the answer starts with."""
    text = answer.strip()
    for pattern in (_LEADING, _NAMED, _LONE):
        found = pattern.search(text)
        if found:
            return next(g for g in found.groups() if g)
    words = " ".join(text.lower().split())
    starts = [k for k, c in zip(_LETTERS, choices) if c.strip() and words.startswith(" ".join(c.lower().split()))]
    return starts[0] if len(starts) == 1 else None


@torch.no_grad()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    new_tokens: int = MMLU_CHAT_NEW_TOKENS,
    batch_size: int = MMLU_CHAT_BATCH,
    progress: bool = True,
    desc: str = "answers",
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """The first `new_tokens` tokens `model` decodes greedily after each prompt (left-padded batches of
    prompts of similar length), decoded without special tokens. With `temperature` > 0 it samples instead
    (and `top_p`): seed torch first for the same answers again."""
    from tqdm.auto import tqdm

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for lo in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            rows = order[lo : lo + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=temperature > 0,
                temperature=temperature or None,
                top_k=None,
                top_p=top_p if temperature > 0 else None,  # greedy: silence the model's sampling defaults
                max_new_tokens=new_tokens,
                pad_token_id=pad,
            )
            for i, row in zip(rows, out[:, width:]):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def mmlu_chat_agreement(
    reference: Any,
    model: Any,
    tokenizer: Any,
    questions: int,
    new_tokens: int = MMLU_CHAT_NEW_TOKENS,
    batch_size: int = MMLU_CHAT_BATCH,
    progress: bool = True,
) -> dict[str, Any]:
    """Both models answer the same `questions` MMLU questions (mmlu_chat_questions) greedily in chat form.
    agreement: share of questions where both answers pick the same letter; accuracy: share whose letter is the
    key (an unparsed answer is wrong); unparsed: answers with no letter found; identical: answers equal as text;
    letters: how often each model picked each letter; chance_agreement: the agreement two models that picked
    letters independently, as often as these two did, would reach (a small model's answers lean to one letter)."""
    docs = mmlu_chat_questions(questions)
    prompts = [mmlu_chat_prompt(tokenizer, d) for d in docs]
    texts = {
        name: greedy_answers(m, tokenizer, prompts, new_tokens, batch_size, progress, desc=f"MMLU-chat {name}")
        for name, m in (("reference", reference), ("model", model))
    }
    picks = {name: [parse_choice(a, d["choices"]) for a, d in zip(ans, docs)] for name, ans in texts.items()}
    key = [_LETTERS[d["answer"]] for d in docs]
    ref, own = picks["reference"], picks["model"]
    letters = {name: {k: p.count(k) for k in _LETTERS} for name, p in (("model", own), ("reference", ref))}
    return {
        "questions": len(docs),
        "agreement": sum(a is not None and a == b for a, b in zip(own, ref)) / len(docs),
        "accuracy": sum(a == k for a, k in zip(own, key)) / len(docs),
        "reference_accuracy": sum(a == k for a, k in zip(ref, key)) / len(docs),
        "unparsed": sum(a is None for a in own),
        "reference_unparsed": sum(a is None for a in ref),
        "identical": sum(a == b for a, b in zip(texts["model"], texts["reference"])) / len(docs),
        "chance_agreement": sum(letters["model"][k] * letters["reference"][k] for k in _LETTERS) / len(docs) ** 2,
        "letters": letters,
        "prompt": "chat template" if getattr(tokenizer, "chat_template", None) else "plain (no chat template)",
        "new_tokens": new_tokens,
        "seed": MMLU_CHAT_SEED,
    }
