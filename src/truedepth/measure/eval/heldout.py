"""What a fine-tune or a compress run is measured on: the held-out and other-domain texts (options), the
perplexity of a model on each, and a cache of those of untrained models (the base, a plan applied to it)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...utils.options import option


@dataclass
class EvalTextOptions:
    """The texts a run reports perplexity on, and how much of each."""

    group_title = "evaluation"
    eval_text: str = option(
        "default", "held-out text spec ('default': the held-out novel; any text spec of `eval --text`)."
    )
    other_text: str = option(
        "other-domain",
        "a text of another kind, to see whether recovery carries over; "
        "'none' to skip ('other-domain': the Jargon File).",
    )
    eval_tokens: int = option(16384, "tokens scored per text.")
    eval_window: int = option(512, "perplexity window.")


def measuring_texts(opts: EvalTextOptions) -> dict[str, str]:
    """{"held_out": ..., "other_domain": ...} as `opts` names them (no other-domain text for 'none')."""
    from .data import load_text

    texts = {"held_out": load_text(opts.eval_text)}
    if opts.other_text.lower() != "none":
        texts["other_domain"] = load_text(opts.other_text)
    return texts


def perplexities(
    model: Any,
    tokenizer: Any,
    texts: dict[str, str],
    tokens: int,
    window: int,
    device: Any,
    dtype: Any,
    progress: bool = True,
) -> dict[str, float]:
    """Perplexity of `model` on each text (under autocast in `dtype`), in eval mode."""
    import torch

    from ...utils.device import autocast
    from .perplexity import perplexity

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, dtype):
            return {
                name: perplexity(model, tokenizer, text, tokens=tokens, window=window, progress=progress)["perplexity"]
                for name, text in texts.items()
            }
    finally:
        model.train(was_training)


def texts_digest(texts: dict[str, str]) -> str:
    """What the perplexity cache keys the measuring texts by."""
    return hashlib.sha256("\0".join(texts.get(k, "") for k in ("held_out", "other_domain")).encode()).hexdigest()


def cached_perplexities(
    measure: Callable[[], dict[str, float]],
    model: str,
    label: str,
    digest: str,
    eval_tokens: int,
    eval_window: int,
    dtype: Any,
    device: Any,
) -> dict[str, float]:
    """Perplexities of a model without training (the base `model`, or a plan `label` applied to it), cached:
    they do not depend on training options. `measure` runs only on a cache miss, so a caller that would have
    to load the model for it loads nothing on a hit."""
    import torch

    from ...core.loading import resolve

    key = json.dumps(
        [
            label,
            _weights_fingerprint(resolve(model)),
            digest,
            eval_tokens,
            eval_window,
            str(dtype),
            torch.device(device).type,
        ]
    )
    path = _cache_path()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cache:
        cache = dict(json.loads(path.read_text()) if path.is_file() else {}, **{key: measure()})
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    return cache[key]


def _cache_path() -> Path:
    from ...utils.env import cache_dir

    return cache_dir() / "finetune-perplexity-cache.json"  # the name older versions wrote: their entries still count


def _weights_fingerprint(path: str) -> str:
    """Folder + size + mtime of its weight files (a hub id has none: then the id itself)."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    return json.dumps(
        [str(Path(path).resolve()) if files else path] + [[f.name, f.stat().st_size, f.stat().st_mtime] for f in files]
    )
