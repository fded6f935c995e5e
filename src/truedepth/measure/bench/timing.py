"""Timing on any device: wait for queued work, time a call, the median of repeats, copy bandwidth.
The one home of timing code: bench, the TP bench, the demo's decode probe and scripts use it."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...utils.options import option


# ---------------------------------------------------------------------------------------------
# Options of a timed decode (bench, tp-bench, demo: each composes those it takes)
# ---------------------------------------------------------------------------------------------
@dataclass
class PromptTokensOption:
    prompt_tokens: int = option(32, "prompt tokens before the timed decode.")


@dataclass
class NewTokensOption:
    new_tokens: int = option(32, "tokens generated per timed decode run.")


@dataclass
class RepeatsOption:
    repeats: int = option(3, "timed runs per measurement; the median is reported.")


@dataclass
class WarmupRunsOption:
    warmup_runs: int = option(1, "untimed runs before the timed ones.", flag="--warmup")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> float:
    """Wall seconds of fn(), with the device synchronised before and after (async work counted)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@functools.cache
def matmul_flops(device: Any, dtype: Any, n: int = 1024, repeats: int = 5) -> float:
    """Matrix-multiply speed of `device` in `dtype` (flop/s), from a fraction of a second of timing.

    Cached per process: bf16_is_faster and compress's budget check ask for the same timings."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    best = min(timed(lambda: a @ a, a.device) for _ in range(repeats))
    return 2 * n**3 / max(best, 1e-9)


@functools.cache
def bf16_is_faster(device: str) -> bool:
    """True where `device` multiplies bf16 matrices clearly (1.2x) faster than fp32: always on a GPU, and on
    a CPU as a fraction of a second of timing says. The avx512_bf16 flag is not enough: on an AMD EPYC with
    it bf16 ran 1.7x faster, on an Intel Xeon VM with it 1.7x slower (docs/COMPRESS.md, 2026-12-01)."""
    import torch

    if torch.device(device).type != "cpu":
        return True
    return matmul_flops("cpu", torch.bfloat16) > 1.2 * matmul_flops("cpu", torch.float32)


def median_time(fn: Callable[[], Any], device: Any, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def measure_bandwidth(device: Any, nbytes: int | None = None, repeats: int = 10) -> float:
    """Device copy bandwidth in GB/s: bytes read + bytes written per second, median of `repeats`."""
    import torch

    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)  # never time zeros
    dst = torch.empty_like(src)
    seconds = median_time(functools.partial(dst.copy_, src), device, repeats, warmup=2)
    del src, dst
    return 2 * nbytes / seconds / 1e9
