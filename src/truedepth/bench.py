"""Prefill latency and decode throughput of the base model and LP plans, in one run.

For the base model and every --plan it measures prefill latency at a few prompt lengths and
decode speed (tokens/s per sequence and in total) under each --mode:

  eager      transformers `generate`, dynamic KV cache, no compilation
  compiled   transformers `generate` with its static cache and torch.compile (its own path)
  fast       truedepth's lean loop: static cache, one compiled token step (CUDA graphs on GPU),
             no per-token host sync (truedepth.fastgen)
  fused      the lean loop with q/k/v and gate/up each run as one GEMM in every layer

Decode speed = (new - k) / (time for `new` tokens - time for k = new/8 tokens): the prefill
and other once-per-call costs cancel, so the modes compare on their per-token cost. Every time
is the median of --repeats runs after --warmup runs, the device synchronised around each run. Ratios are against the base model in the same mode and
batch ("x base") and against the base model under transformers' compiled path ("x HF comp.").
The run also measures the device's copy bandwidth and reports the fraction of the
bandwidth bound reached: (weight bytes + KV-cache bytes read per step) / step time / bandwidth.

--shape builds random-weight models of published sizes on the device (no download): speed does
not depend on weight values. Examples:

  truedepth bench --shape llama-2-7b                       # base vs its default plan parallel=16:30
  truedepth bench --shape llama-3.2-3b --plan parallel=14:24 --batch 1,8,32 --json b.json --plot b.png
  truedepth bench --model default --mode eager,fast --new 64  # the real offline default model on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODES = ("eager", "compiled", "fast", "fused")
HF_MODES = ("eager", "compiled")


# ---------------------------------------------------------------------------------------------
# Settings, checked before any work
# ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    prompt: int = 128
    new: int = 256
    batches: tuple[int, ...] = (1,)
    modes: tuple[str, ...] = MODES
    prefill: tuple[int, ...] = (128, 512)
    repeats: int = 3
    warmup: int = 1
    warmup_new: int | None = None  # tokens per warm-up run (default: new); a few suffice to compile
    backend: str = "inductor"
    seed: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def parse_int_list(text: str, what: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated integers, e.g. 1,8,32; got {text!r}.") from None
    if not values or min(values) < minimum:
        raise ValueError(f"--{what} needs integers >= {minimum}, got {text!r}.")
    return values


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in str(text).split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown --mode {', '.join(unknown) or text!r}; choose from {', '.join(MODES)} "
                         "(comma-separated).")
    return tuple(m for m in MODES if m in modes)  # canonical order: `fused` rewires the model, so last


def check_settings(s: Settings, max_positions: int | None) -> None:
    if s.prompt < 1:
        raise ValueError(f"--prompt must be at least 1 token, got {s.prompt}.")
    if s.new < 2:
        raise ValueError(f"--new must be at least 2 (decode speed is measured from the 2nd token on), got {s.new}.")
    if s.repeats < 1 or s.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {s.repeats} and {s.warmup}.")
    longest = max(s.prompt + s.new, *s.prefill)
    if max_positions and longest > max_positions:
        raise ValueError(f"a sequence of {longest} tokens exceeds the model's {max_positions} positions; "
                         "lower --prompt/--new/--prefill.")


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
    seconds = median_time(lambda: dst.copy_(src), device, repeats, warmup=2)
    del src, dst
    return 2 * nbytes / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# Bytes a decode step must read
# ---------------------------------------------------------------------------------------------
def weight_bytes_read(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the input embedding
    table, of which only one row per token is read (unless it is tied to the output head)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params if tied or p is not embed)


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes one token adds (per sequence): K and V of every layer, wide layers included."""
    from .transform import decoder_layers

    total = 0
    for layer in decoder_layers(model):
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            total += proj.out_features * proj.weight.element_size()
    return total


def bound_fraction(weight_bytes: int, kv_per_token: int, batch: int, context: float, step_s: float,
                   bandwidth_gbs: float) -> tuple[float, float]:
    """(fraction of the bandwidth bound, bound in tokens/s per sequence) for one decode step."""
    step_bytes = weight_bytes + kv_per_token * batch * context
    bound_step_s = step_bytes / (bandwidth_gbs * 1e9)
    return bound_step_s / step_s, 1.0 / bound_step_s


# ---------------------------------------------------------------------------------------------
# Runners: one callable per mode, ids -> generate exactly n new tokens
# ---------------------------------------------------------------------------------------------
def _hf_generation_config(model: Any, mode: str, backend: str, max_len: int) -> Any:
    import copy

    import torch
    from transformers import CompileConfig

    gc = copy.deepcopy(model.generation_config)
    # exactly n tokens: no EOS stop; greedy without the model's sampling defaults
    gc.eos_token_id = None
    gc.pad_token_id = gc.pad_token_id if gc.pad_token_id is not None else 0
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p = False, None, None, None
    if mode == "compiled":
        gc.cache_implementation = "static"
        gc.max_cache_len = max_len  # one cache shape for every call, short or long: no recompiles
        on_gpu = next(model.parameters()).device.type == "cuda"
        cc = CompileConfig(backend=backend, mode="reduce-overhead" if on_gpu else "default")
        if not on_gpu:
            cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
        gc.compile_config = cc
    del torch
    return gc


def make_runner(model: Any, mode: str, settings: Settings, max_batch: int,
                dynamic: bool | None = None) -> Callable[[Any, int], Any]:
    """A function (input_ids, n) -> output ids that generates exactly n new tokens greedily."""
    import torch

    if mode in HF_MODES:
        gc = _hf_generation_config(model, mode, settings.backend, settings.prompt + settings.new)

        def run_hf(ids: Any, n: int) -> Any:
            gc.max_new_tokens = n
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        run_hf.short_warmup_ok = mode == "eager"  # type: ignore[attr-defined]  # compiled: same shapes as timed
        return run_hf
    from .fastgen import FastGenerator

    gen = FastGenerator(model, max_batch=max_batch, max_seq=settings.prompt + settings.new,
                        compile=True, backend=settings.backend, fuse=(mode == "fused"), dynamic=dynamic)

    def run_fast(ids: Any, n: int) -> Any:
        return gen.generate(ids, n)
    run_fast.generator = gen  # type: ignore[attr-defined]  # for profile_decode
    run_fast.short_warmup_ok = True  # type: ignore[attr-defined]  # its cache is sized once, for prompt + new
    return run_fast


def profile_decode(generator: Any, ids: Any, steps: int = 16) -> dict[str, Any]:
    """Where a decode step's time goes: device kernels per step, device-busy time, the gap
    (step time the device sits idle: launch latency, host work) and the slowest kernels.

    Runs `steps` token steps of a warmed-up FastGenerator under torch.profiler."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    room = generator.max_seq - ids.shape[1] - 3  # the static cache must hold every traced token
    if room < 1:
        raise ValueError(f"no room to profile: prompt {ids.shape[1]} fills max_seq {generator.max_seq}.")
    steps = min(steps, room)
    device = ids.device
    buf = torch.empty(ids.shape[0], steps + 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        buf[:, :1] = generator.prefill(ids)
        for i in range(2):  # steps outside the trace: nothing left to record or compile
            buf[:, i + 1:i + 2] = generator.step(buf[:, i:i + 1])
        synchronize(device)
        # host time per step: the loop enqueues work without waiting for the device, so if this is
        # well under the step time the device, not Python, sets the pace
        buf[:, :1] = generator.prefill(ids)
        synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            buf[:, i + 1:i + 2] = generator.step(buf[:, i:i + 1])
        host = time.perf_counter() - start
        synchronize(device)
        unprofiled = time.perf_counter() - start
        buf[:, :1] = generator.prefill(ids)
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for i in range(steps):
                buf[:, i + 1:i + 2] = generator.step(buf[:, i:i + 1])
            synchronize(device)
            wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # union of kernel intervals, in microseconds
        if b > end:
            busy += b - max(a, end)
            end = b
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    total = sum(by_name.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    step_us = 1e6 * wall / steps
    return {"steps": steps, "step_us": step_us, "step_us_unprofiled": 1e6 * unprofiled / steps,
            "host_us_per_step": 1e6 * host / steps, "kernels_per_step": len(kernels) / steps,
            "device_busy_us_per_step": busy / steps, "idle_fraction": max(0.0, 1 - busy / steps / step_us)
            if kernels else None,
            "top_kernels": [{"name": n[:120], "us_per_step": t / steps, "share": t / total} for n, t in top]}


def _checked(runner: Callable[[Any, int], Any], ids: Any, n: int) -> Any:
    out = runner(ids, n)
    if out.shape[1] != ids.shape[1] + n:  # a rate over fewer tokens would be a lie
        raise RuntimeError(f"generation returned {out.shape[1] - ids.shape[1]} new tokens instead of {n}.")
    return out


def short_run_tokens(new: int) -> int:
    """Tokens of the short run whose time is subtracted from the full run's."""
    return max(1, min(new // 8, new - 1))


def measure_decode(runner: Callable[[Any, int], Any], ids: Any, settings: Settings) -> dict[str, float]:
    """Steady-state decode speed: (new - k) / (t(new tokens) - t(k tokens)), with k = new/8.

    Subtracting a short run cancels everything a call pays once (prefill, cache allocation,
    transformers re-recording its CUDA graphs for the fresh static cache each `generate` call),
    so every mode is compared on its per-token cost. `call_overhead_ms` is that once-per-call
    part: t(k) minus its k - 1 decode steps."""
    results, errors = measure_decode_interleaved({"": runner}, ids, settings)
    if errors:
        raise errors[""]
    return results[""]


def measure_decode_interleaved(runners: dict[str, Callable[[Any, int], Any]], ids: Any, settings: Settings
                               ) -> tuple[dict[str, dict[str, float]], dict[str, Exception]]:
    """`measure_decode` for several runners whose timed runs alternate (A B C A B C ...), so load
    that drifts during the run (a shared machine) affects them alike. A runner that raises is
    reported in the second dict and dropped; the others go on."""
    device = ids.device
    n, k = settings.new, short_run_tokens(settings.new)
    errors: dict[str, Exception] = {}
    warmup_s: dict[str, float] = {}
    for label, runner in runners.items():
        start = time.perf_counter()
        warm_n = n if not getattr(runner, "short_warmup_ok", False) else min(settings.warmup_new or n, n)
        try:
            for _ in range(settings.warmup):  # the first run of a compiled mode compiles and records graphs
                _checked(runner, ids, warm_n)
            synchronize(device)
        except Exception as e:  # noqa: BLE001 - reported per runner
            errors[label] = e
        warmup_s[label] = time.perf_counter() - start
    full: dict[str, list[float]] = {label: [] for label in runners if label not in errors}
    short: dict[str, list[float]] = {label: [] for label in full}
    for _ in range(settings.repeats):
        for label in list(full):
            try:
                full[label].append(timed(lambda: _checked(runners[label], ids, n), device))
                short[label].append(timed(lambda: _checked(runners[label], ids, k), device))
            except Exception as e:  # noqa: BLE001
                errors[label] = e
                del full[label], short[label]
    results = {}
    for label in full:
        t_full, t_short = statistics.median(full[label]), statistics.median(short[label])
        step_s = max(t_full - t_short, 1e-9) / (n - k)
        results[label] = {"decode_tok_s": 1.0 / step_s, "decode_tok_s_total": ids.shape[0] / step_s,
                          "step_ms": 1e3 * step_s, "generate_s": t_full,
                          "call_overhead_ms": 1e3 * (t_short - (k - 1) * step_s), "warmup_s": warmup_s[label]}
    return results, errors


def measure_prefill(model: Any, lengths: tuple[int, ...], settings: Settings) -> dict[str, float]:
    """Batch-1 prefill latency (ms) per prompt length: one forward that fills a fresh KV cache."""
    return measure_prefill_interleaved({"": model}, lengths, settings)[""]


def measure_prefill_interleaved(models: dict[str, Any], lengths: tuple[int, ...], settings: Settings
                                ) -> dict[str, dict[str, float]]:
    """Prefill latency of several models, their timed runs alternating (see measure_decode_interleaved)."""
    import torch

    gen = torch.Generator().manual_seed(settings.seed + 1)
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    out: dict[str, dict[str, float]] = {label: {} for label in models}
    for length in lengths:
        ids = torch.randint(3, first.config.vocab_size, (1, length), generator=gen).to(device)

        def forward(model: Any) -> Any:
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=True, logits_to_keep=1)
        for model in models.values():
            for _ in range(max(settings.warmup, 1)):
                forward(model)
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(settings.repeats):
            for label, model in models.items():
                times[label].append(timed(lambda: forward(model), device))
        for label in models:
            out[label][str(length)] = 1e3 * statistics.median(times[label])
    return out


def random_prompt(model: Any, batch: int, settings: Settings) -> Any:
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    return torch.randint(3, model.config.vocab_size, (batch, settings.prompt), generator=gen).to(device)


def release_compiled_state() -> None:
    """Drop compiled code, CUDA graphs and cached blocks of a model we are done with."""
    import gc

    import torch

    torch._dynamo.reset()
    try:
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001 - older/newer torch without this helper: nothing to free
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def allow_many_compiles() -> None:
    """One process compiles many models and batch sizes; past dynamo's default limit of 8
    recompiles it would silently fall back to eager and the numbers would be wrong."""
    import torch._dynamo.config as dyn

    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(dyn, name) and getattr(dyn, name) < value:
            setattr(dyn, name, value)


# ---------------------------------------------------------------------------------------------
# Several models (base and plans), all modes and batches
# ---------------------------------------------------------------------------------------------
def bench_models(models: dict[str, Any], label: str, settings: Settings, bandwidth_gbs: float | None,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 progress: Any = None) -> list[dict[str, Any]]:
    """Records (one per plan, mode and batch) for loaded models keyed by plan; the plans' timed
    runs alternate. `fused` rewires the models while it runs (undone at the end)."""
    from .transform import decoder_layers

    records = []
    prefill = measure_prefill_interleaved(models, settings.prefill, settings) if settings.prefill else {}
    common = {plan: {"model": label, "plan": plan, "depth": len(decoder_layers(model)), "prompt": settings.prompt,
                     "new": settings.new, "prefill_ms": prefill.get(plan, {}), "weight_bytes": weight_bytes_read(model),
                     "kv_bytes_per_token": kv_bytes_per_token(model), "bandwidth_GBps": bandwidth_gbs}
              for plan, model in models.items()}
    for mode in settings.modes:
        runners: dict[str, Any] = {}
        failed: dict[str, Exception] = {}
        for batch in settings.batches:
            if progress is not None:
                progress.set_postfix_str(f"{mode} b{batch}")
            for plan, model in models.items():
                if plan not in runners and plan not in failed:
                    try:
                        runners[plan] = make_runner(model, mode, settings, max(settings.batches))
                    except Exception as e:  # noqa: BLE001 - one failed mode must not lose the others' numbers
                        failed[plan] = e
            ids = random_prompt(next(iter(models.values())), batch, settings)
            results, errors = measure_decode_interleaved(runners, ids, settings)
            for plan in models:
                record = dict(common[plan], mode=mode, batch=batch)
                error = failed.get(plan) or errors.get(plan)
                if error is not None:
                    record["error"] = f"{type(error).__name__}: {error}"
                    runners.pop(plan, None)
                else:
                    record.update(results[plan])
                    add_bound(record)
                records.append(record)
                if on_record:
                    on_record(record)
                if progress is not None:
                    progress.update(1)
        del runners
        release_compiled_state()
    if "fused" in settings.modes:
        from .fastgen import unfuse_projections

        for model in models.values():
            unfuse_projections(model)
    return records


def add_bound(record: dict[str, Any]) -> None:
    if not record.get("bandwidth_GBps") or "step_ms" not in record:
        return
    context = record["prompt"] + (record["new"] - 1) / 2  # mean cache length over the decode
    frac, bound = bound_fraction(record["weight_bytes"], record["kv_bytes_per_token"], record["batch"], context,
                                 record["step_ms"] / 1e3, record["bandwidth_GBps"])
    record["bound_fraction"], record["bound_tok_s"] = frac, bound


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Speed-ups against the base model: same mode and batch, and base under HF's compiled path."""
    base = {(r["model"], r["mode"], r["batch"]): r for r in records if r["plan"] == "base" and "decode_tok_s" in r}
    for r in records:
        if "decode_tok_s" not in r:
            continue
        same = base.get((r["model"], r["mode"], r["batch"]))
        comp = base.get((r["model"], "compiled", r["batch"]))
        r["speedup_vs_base"] = r["decode_tok_s"] / same["decode_tok_s"] if same else None
        r["speedup_vs_base_compiled"] = r["decode_tok_s"] / comp["decode_tok_s"] if comp else None
        pre = (same or next((b for (m, _, _), b in base.items() if m == r["model"]), None) or {}).get("prefill_ms", {})
        r["prefill_speedup"] = {k: pre[k] / v for k, v in r.get("prefill_ms", {}).items() if k in pre and v}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def step_gb(r: dict[str, Any]) -> float | None:
    """GB one decode step must read: weights + the KV cache at the mean context length."""
    if "weight_bytes" not in r or "kv_bytes_per_token" not in r:
        return None
    context = r.get("prompt", 0) + (r.get("new", 1) - 1) / 2
    return (r["weight_bytes"] + r["kv_bytes_per_token"] * r.get("batch", 1) * context) / 1e9


def format_table(records: list[dict[str, Any]]) -> str:
    lengths = sorted({int(k) for r in records for k in r.get("prefill_ms", {})})
    head = ["model", "plan", "depth", "mode", "batch", *[f"prefill {n} ms" for n in lengths], "tok/s/seq",
            "tok/s total", "x base", "x HF comp.", "GB/step", "% bound"]
    rows = [head]
    for r in records:
        if "error" in r:
            rows.append([r["model"], r["plan"], str(r.get("depth", "-")), r["mode"], str(r["batch"]), *[""] * len(lengths),
                         "error: " + r["error"][:60], "", "", "", "", ""])
            continue
        pre = r.get("prefill_ms", {})
        rows.append([r["model"], r["plan"], str(r.get("depth", "-")), r["mode"], str(r["batch"]),
                     *[_fmt(pre.get(str(n)), ".1f") for n in lengths],
                     _fmt(r["decode_tok_s"], ".1f"), _fmt(r.get("decode_tok_s_total"), ".1f"),
                     _fmt(r.get("speedup_vs_base"), ".2f"), _fmt(r.get("speedup_vs_base_compiled"), ".2f"),
                     _fmt(step_gb(r), ".2f"), _fmt(100 * r["bound_fraction"] if r.get("bound_fraction") else None, ".0f")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(records: list[dict[str, Any]]) -> str:
    """The same table as GitHub markdown (for docs/BENCHMARKS.md)."""
    lengths = sorted({int(k) for r in records for k in r.get("prefill_ms", {})})
    head = ["model", "plan", "depth", "mode", "batch", *[f"prefill {n} (ms)" for n in lengths], "decode tok/s/seq",
            "tok/s total", "x base (same mode)", "x base HF compiled", "GB read/step", "% of bandwidth bound"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r:
            out.append(f"| {r['model']} | {r['plan']} | {r.get('depth', '-')} | {r['mode']} | {r['batch']} | "
                       + " | ".join([""] * len(lengths)) + f" | failed: {r['error'][:80]} | | | | | |")
            continue
        pre = r.get("prefill_ms", {})
        cells = [r["model"], r["plan"], str(r.get("depth", "-")), r["mode"], str(r["batch"]),
                 *[_fmt(pre.get(str(n)), ".1f") for n in lengths], _fmt(r["decode_tok_s"], ".1f"),
                 _fmt(r.get("decode_tok_s_total"), ".1f"), _fmt(r.get("speedup_vs_base"), ".2f"),
                 _fmt(r.get("speedup_vs_base_compiled"), ".2f"), _fmt(step_gb(r), ".2f"),
                 _fmt(100 * r["bound_fraction"] if r.get("bound_fraction") else None, ".0f")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Total decode tokens/s against batch size (one panel per mode, one line per plan);
    with a single batch size, grouped bars per mode instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "decode_tok_s" in r]
    if not ok:
        raise RuntimeError("no successful measurement to plot.")
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    labels = list(dict.fromkeys(f"{r['model']} {r['plan']}" for r in ok))
    batches = sorted({r["batch"] for r in ok})
    value = {(f"{r['model']} {r['plan']}", r["mode"], r["batch"]): r["decode_tok_s_total"] for r in ok}
    if len(batches) == 1:
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(modes) * max(1, len(labels)) / 2, 4))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs = [j + i * width for j, _ in enumerate(modes)]
            ys = [value.get((label, m, batches[0]), 0) for m in modes]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(modes))], modes)
        ax.set_ylabel(f"decode tokens/s (batch {batches[0]})")
        ax.set_ylim(bottom=0)
    else:
        fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.8), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for label in labels:
                pts = [(b, value[(label, mode, b)]) for b in batches if (label, mode, b) in value]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_title(mode)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("batch size")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("decode tokens/s, all sequences")
        ax = axes[0][-1]
    ax.legend(fontsize=8)
    fig.suptitle("truedepth bench: base vs LP plans", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def environment(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"date": datetime.date.today().isoformat(), "device": str(dev), "device_name": name,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "command": " ".join(["truedepth", *sys.argv[1:]]) if sys.argv else ""}


def write_json(path: str | os.PathLike, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    os.replace(tmp, path)  # a reader never sees half a file


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="'default' (offline SmolLM2-135M-Instruct), a hub id or a local folder. Default: the "
                          "default model unless --shape is given")
    src.add_argument("--shape", default=None,
                     help="random-weight model of a published size, no download: llama-2-7b, llama-3.2-3b, "
                          "llama-3.1-8b, qwen2.5-7b, smollm2-135m (= the default model's shape), tiny")
    parser.add_argument("--plan", action="append", default=None,
                        help="a plan to compare with the base model (repeat for several). Default: the shape's "
                             "usual plan (llama-2-7b: parallel=16:30, llama-3.2-3b: parallel=14:24, ...)")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated (default %(default)s)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default %(default)s)")
    parser.add_argument("--new", type=int, default=None, help="new tokens per generation (default 256 on GPU, "
                                                              "64 on CPU)")
    parser.add_argument("--mode", default=None, help=f"comma-separated from {', '.join(MODES)} (default: all on "
                                                     "GPU; eager,fast on CPU, where compiling takes minutes)")
    parser.add_argument("--prefill", default=None,
                        help="prompt lengths for the prefill latency, comma-separated (default 128,512,2048 on GPU, "
                             "128,512 on CPU); 'none' to skip")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is "
                                                              "reported (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s; the "
                                                             "first run of a compiled mode compiles)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend for the compiled modes (default %(default)s; 'eager' or "
                             "'aot_eager' skip code generation: for debugging only)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write one record per model, plan, mode "
                                                                    "and batch (rewritten after each record)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--plot", default=None, metavar="FILE", help="plot decode tokens/s per plan, mode and "
                                                                    "batch (PNG/SVG/PDF; needs matplotlib)")
    parser.add_argument("--sequential", action="store_true",
                        help="hold one model in memory at a time (default: base and every plan together, their "
                             "timed runs alternating, so load that drifts during the run affects all alike)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")


def settings_from_args(args: argparse.Namespace, on_gpu: bool) -> Settings:
    prefill = args.prefill if args.prefill is not None else ("128,512,2048" if on_gpu else "128,512")
    return Settings(
        prompt=args.prompt, new=args.new if args.new is not None else (256 if on_gpu else 64),
        batches=parse_int_list(args.batch, "batch"),
        modes=parse_modes(args.mode or (",".join(MODES) if on_gpu else "eager,fast")),
        prefill=() if str(prefill).lower() == "none" else parse_int_list(prefill, "prefill"),
        repeats=args.repeats, warmup=args.warmup, backend=args.backend, seed=args.seed)


class Source:
    """Where models come from: a named shape (random weights) or a checkpoint; one fresh model per plan."""

    def __init__(self, args: argparse.Namespace, dtype: Any, device: Any) -> None:
        from .shapes import get_shape, shape_config

        self.shape = get_shape(args.shape) if args.shape else None
        self.model_id = None if self.shape else (args.model or "default")
        self.dtype, self.device, self.seed = dtype, device, args.seed
        if self.shape:
            self.config = shape_config(self.shape.name)
            self.label = self.shape.name
        else:
            from transformers import AutoConfig

            from .models import resolve

            self.config = AutoConfig.from_pretrained(resolve(self.model_id), trust_remote_code=False)
            self.label = self.model_id if self.model_id != "default" else "default (SmolLM2-135M)"

    @property
    def num_layers(self) -> int:
        info = getattr(self.config, "truedepth", None)
        if info:
            raise ValueError(f"{self.model_id} is already transformed (plan {info['plan'].get('plan')}); bench "
                             "the original model and pass the plan with --plan.")
        return self.config.num_hidden_layers

    def default_plans(self) -> list[str]:
        from .shapes import SHAPES

        if self.shape:
            return [self.shape.default_plan]
        for shape in SHAPES.values():  # a checkpoint with a known shape (e.g. the default model)
            c = shape.config
            if all(getattr(self.config, k, None) == c[k] for k in
                   ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")):
                return [shape.default_plan]
        return []

    def build(self, plan: str) -> Any:
        from .transform import apply_plan

        if self.shape:
            from .shapes import build_shape

            model = build_shape(self.shape.name, self.dtype, self.device, seed=self.seed)
        else:
            from .models import load

            model, _ = load(self.model_id, dtype=self.dtype, device=self.device)
        if plan != "base":
            apply_plan(model, plan)
        return model


def resolve_plans(args: argparse.Namespace, source: Source) -> list[str]:
    from .plan import as_plan

    given = args.plan if args.plan is not None else source.default_plans()
    plans = ["base"]
    for text in given:
        plan = as_plan(text)
        plan.validate(source.num_layers)  # a bad plan fails now, before any model is built
        if str(plan) not in plans:
            plans.append(str(plan))
    return plans


def run(args: argparse.Namespace) -> int:
    import torch

    from .models import as_dtype, default_device

    device = torch.device(args.device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no GPU; use --device cpu.")
    on_gpu = device.type == "cuda"
    dtype = as_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    settings = settings_from_args(args, on_gpu)
    if args.threads:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1.")
        torch.set_num_threads(args.threads)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or truedepth[plot]).") from None
    source = Source(args, dtype, device)
    check_settings(settings, getattr(source.config, "max_position_embeddings", None))
    plans = resolve_plans(args, source)
    if len(plans) == 1:
        print("note: no plan to compare; pass --plan, e.g. --plan parallel=14:24", file=sys.stderr)

    allow_many_compiles()
    meta = environment(device) | {"model": source.label, "dtype": str(dtype).replace("torch.", ""),
                                  "settings": {k: v for k, v in vars(settings).items() if k != "extra"}}
    meta["bandwidth_GBps"] = measure_bandwidth(device)
    records: list[dict[str, Any]] = []

    def save(record: dict[str, Any]) -> None:
        records.append(record)
        if args.json:  # rewritten after every record: an interrupted run keeps what it measured
            add_ratios(records)
            write_json(args.json, meta, records)

    from tqdm.auto import tqdm

    total = len(plans) * len(settings.modes) * len(settings.batches)
    # all models at once, their runs alternating (fair under drifting load), or one at a time
    groups = [[plan] for plan in plans] if args.sequential else [plans]
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr) as bar:
        for group in groups:
            models = {plan: source.build(plan) for plan in group}
            bench_models(models, source.label, settings, meta["bandwidth_GBps"], on_record=save, progress=bar)
            del models
            release_compiled_state()
    add_ratios(records)
    records.sort(key=lambda r: (plans.index(r["plan"]), MODES.index(r["mode"]), r["batch"]))
    print(f"{meta['device_name']} ({meta['device']}), {meta['dtype']}, torch {meta['torch']}, transformers "
          f"{meta['transformers']}, copy bandwidth {meta['bandwidth_GBps']:.1f} GB/s; prompt {settings.prompt}, "
          f"new {settings.new}, median of {settings.repeats}")
    print(format_markdown(records) if args.markdown else format_table(records))
    if args.json:
        write_json(args.json, meta, records)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(records, args.plot)}")
    failed = [r for r in records if "error" in r]
    return 1 if failed and len(failed) == len(records) else 0
