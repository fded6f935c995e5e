"""Run a GGUF file with llama.cpp through llama-cpp-python: logits, greedy tokens, perplexity, speed.

Used to check exported files against truedepth's own models and to measure them; every number
comes from llama.cpp itself (its logits, its own timers). llama.cpp's own programs (llama-server,
llama-bench, ...): `find_program` finds them, `python -m truedepth.deploy.llamacpp.build` builds them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from .programs import PROGRAMS, MissingProgramError, find_program  # noqa: F401  (the public finder)


def open_gguf(
    path: str | os.PathLike, n_ctx: int = 1024, threads: int = 2, logits_all: bool = True, f32_cache: bool = False
) -> Any:
    """A llama.cpp model and context; `logits_all` keeps every position's logits (tests), off for speed.

    llama.cpp keeps K and V in f16 by default (as llama-cli does); `f32_cache` keeps them in f32,
    so an f32 file can be compared with an fp32 model without the cache's rounding."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
        **cache,
    )


def logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """(len(ids), vocab) float32 logits of one sequence, from an empty cache."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm: Any, ids: Sequence[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens after `ids` (argmax of llama.cpp's logits; never stops at EOS)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    out: list[int] = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


class LlamaCppLM(nn.Module):
    """A llama.cpp model behind the call `model(input_ids=..., logits_to_keep=...).logits` that
    truedepth.measure.eval.perplexity makes, so llama.cpp is scored on exactly the same windows as transformers."""

    def __init__(self, llm: Any) -> None:
        super().__init__()
        self.llm = llm
        self._device = nn.Parameter(torch.empty(0), requires_grad=False)  # tells callers: cpu

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_: Any) -> SimpleNamespace:
        rows = [torch.from_numpy(logits(self.llm, row.tolist())) for row in input_ids]
        out = torch.stack(rows)
        return SimpleNamespace(logits=out[:, -logits_to_keep:] if logits_to_keep else out)


def speed(llm: Any, prompt: Sequence[int], new_tokens: int) -> dict[str, float]:
    """Prompt-processing and decode tokens/s of one batch-1 run, by wall clock and by this process's
    CPU time around llama_decode (llama.cpp's own perf counters stay at zero on llama-cpp-python's
    decode path). With one thread, CPU time is the time an idle core would take: a figure that
    other jobs on a shared machine do not distort (with more, it counts their spin-waiting)."""
    import llama_cpp

    def timed(tokens: list[int]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        llm.eval(tokens)
        llama_cpp.llama_synchronize(llm._ctx.ctx)  # no public handle; decode may return early
        return time.perf_counter() - wall, time.process_time() - cpu

    llm.reset()
    prompt_s = timed(list(map(int, prompt)))
    token = int(prompt[-1])  # the token fed back does not change the cost: no sampling needed
    steps = [timed([token]) for _ in range(new_tokens)]
    decode_s = (sum(w for w, _ in steps), sum(c for _, c in steps))
    return {
        "prompt_tokens": len(prompt),
        "decode_tokens": new_tokens,
        "prompt_tok_s": len(prompt) / prompt_s[0],
        "decode_tok_s": new_tokens / decode_s[0],
        "prompt_cpu_tok_s": len(prompt) / prompt_s[1],
        "decode_cpu_tok_s": new_tokens / decode_s[1],
    }
