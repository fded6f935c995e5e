"""Decode and prefill speed of models (the measurements behind `truedepth bench`): runners, timing in turns, bounds."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...utils.errors import MeasurementError, UserError
from .bound import add_bound, bound_fraction, kv_bytes_per_token, weight_bytes_read  # noqa: F401 (re-exported)
from .timing import median_time, synchronize, timed  # noqa: F401  (median_time: used by scripts)

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


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in str(text).split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UserError(
            f"unknown --mode {', '.join(unknown) or text!r}; choose from {', '.join(MODES)} (comma-separated)."
        )
    return tuple(m for m in MODES if m in modes)  # canonical order: `fused` rewires the model, so last


def check_settings(s: Settings, max_positions: int | None) -> None:
    if s.prompt < 1:
        raise UserError(f"--prompt must be at least 1 token, got {s.prompt}.")
    if s.new < 2:
        raise UserError(f"--new must be at least 2 (decode speed is measured from the 2nd token on), got {s.new}.")
    if s.repeats < 1 or s.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {s.repeats} and {s.warmup}.")
    longest = max([s.prompt + s.new, *s.prefill])  # --prefill none: no prefill lengths
    if max_positions and longest > max_positions:
        raise UserError(
            f"a sequence of {longest} tokens exceeds the model's {max_positions} positions; "
            "lower --prompt/--new/--prefill."
        )


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


def make_runner(
    model: Any, mode: str, settings: Settings, max_batch: int, dynamic: bool | None = None
) -> Callable[[Any, int], Any]:
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
    from ...runtime.generate import FastGenerator

    gen = FastGenerator(
        model,
        max_batch=max_batch,
        max_seq=settings.prompt + settings.new,
        compile=True,
        backend=settings.backend,
        fuse=(mode == "fused"),
        dynamic=dynamic,
    )

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
        raise UserError(f"no room to profile: prompt {ids.shape[1]} fills max_seq {generator.max_seq}.")
    steps = min(steps, room)
    device = ids.device
    buf = torch.empty(ids.shape[0], steps + 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        buf[:, :1] = generator.prefill(ids)
        for i in range(2):  # steps outside the trace: nothing left to record or compile
            buf[:, i + 1 : i + 2] = generator.step(buf[:, i : i + 1])
        synchronize(device)
        # host time per step: the loop enqueues work without waiting for the device, so if this is
        # well under the step time the device, not Python, sets the pace
        buf[:, :1] = generator.prefill(ids)
        synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            buf[:, i + 1 : i + 2] = generator.step(buf[:, i : i + 1])
        host = time.perf_counter() - start
        synchronize(device)
        unprofiled = time.perf_counter() - start
        buf[:, :1] = generator.prefill(ids)
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for i in range(steps):
                buf[:, i + 1 : i + 2] = generator.step(buf[:, i : i + 1])
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
    return {
        "steps": steps,
        "step_us": step_us,
        "step_us_unprofiled": 1e6 * unprofiled / steps,
        "host_us_per_step": 1e6 * host / steps,
        "kernels_per_step": len(kernels) / steps,
        "device_busy_us_per_step": busy / steps,
        "idle_fraction": max(0.0, 1 - busy / steps / step_us) if kernels else None,
        "top_kernels": [{"name": n[:120], "us_per_step": t / steps, "share": t / total} for n, t in top],
    }


def _checked(runner: Callable[[Any, int], Any], ids: Any, n: int) -> Any:
    out = runner(ids, n)
    if out.shape[1] != ids.shape[1] + n:  # a rate over fewer tokens would be a lie
        # programming error: the runners generate exactly n tokens
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


def measure_decode_interleaved(
    runners: dict[str, Callable[[Any, int], Any]], ids: Any, settings: Settings
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
                full[label].append(timed(functools.partial(_checked, runners[label], ids, n), device))
                short[label].append(timed(functools.partial(_checked, runners[label], ids, k), device))
            except Exception as e:  # noqa: BLE001
                errors[label] = e
                del full[label], short[label]
    results = {}
    for label in list(full):
        t_full, t_short = statistics.median(full[label]), statistics.median(short[label])
        try:
            check_difference(full[label], short[label], settings)
        except MeasurementError as e:
            errors[label] = e
            continue
        step_s = (t_full - t_short) / (n - k)
        results[label] = {
            "decode_tok_s": 1.0 / step_s,
            "decode_tok_s_total": ids.shape[0] / step_s,
            "step_ms": 1e3 * step_s,
            "generate_s": t_full,
            "call_overhead_ms": 1e3 * (t_short - (k - 1) * step_s),
            "warmup_s": warmup_s[label],
        }
    return results, errors


def check_difference(full: list[float], short: list[float], settings: Settings) -> None:
    """Refuse a decode speed that the timings cannot support: the difference of the medians
    t(new) - t(k) must be positive and above the timing noise, twice the larger median absolute
    deviation of the repeated full and short runs (robust to one stray run; with 2 repeats it is
    their spread, with --repeats 1 there is none to compare with)."""
    n, k = settings.new, short_run_tokens(settings.new)
    t_full, t_short = statistics.median(full), statistics.median(short)
    diff = t_full - t_short
    noise = 2 * max(median_deviation(full), median_deviation(short))
    if diff > noise and diff > 0:
        return
    raise MeasurementError(
        f"decode speed not measurable: {n} tokens took {1e3 * t_full:.2f} ms and {k} took {1e3 * t_short:.2f} ms; "
        f"their difference ({1e3 * diff:.2f} ms) is not above the timing noise ({1e3 * noise:.2f} ms, from the "
        f"spread of the repeats). Raise --new (now {n}) so the decode dominates, and --repeats "
        f"(now {settings.repeats})."
    )


def median_deviation(times: list[float]) -> float:
    middle = statistics.median(times)
    return statistics.median(abs(t - middle) for t in times)


def measure_prefill(model: Any, lengths: tuple[int, ...], settings: Settings) -> dict[str, float]:
    """Batch-1 prefill latency (ms) per prompt length: one forward that fills a fresh KV cache."""
    return measure_prefill_interleaved({"": model}, lengths, settings)[""]


def measure_prefill_interleaved(
    models: dict[str, Any], lengths: tuple[int, ...], settings: Settings
) -> dict[str, dict[str, float]]:
    """Prefill latency of several models, their timed runs alternating (see measure_decode_interleaved)."""
    import torch

    gen = torch.Generator().manual_seed(settings.seed + 1)
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    out: dict[str, dict[str, float]] = {label: {} for label in models}
    for length in lengths:
        ids = torch.randint(3, first.config.vocab_size, (1, length), generator=gen).to(device)
        for model in models.values():
            for _ in range(max(settings.warmup, 1)):
                _prefill(model, ids)
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(settings.repeats):
            for label, model in models.items():
                times[label].append(timed(functools.partial(_prefill, model, ids), device))
        for label in models:
            out[label][str(length)] = 1e3 * statistics.median(times[label])
    return out


def _prefill(model: Any, ids: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)


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

    for name, value in (
        ("recompile_limit", 64),
        ("cache_size_limit", 64),
        ("accumulated_recompile_limit", 4096),
        ("accumulated_cache_size_limit", 4096),
    ):
        if hasattr(dyn, name) and getattr(dyn, name) < value:
            setattr(dyn, name, value)


# ---------------------------------------------------------------------------------------------
# Several models (base and plans), all modes and batches
# ---------------------------------------------------------------------------------------------
def bench_models(
    models: dict[str, Any],
    label: str,
    settings: Settings,
    bandwidth_gbs: float | None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Records (one per plan, mode and batch) for loaded models keyed by plan; the plans' timed
    runs alternate. `fused` rewires the models while it runs (undone at the end)."""
    from ...core.arch import decoder_layers

    records = []
    prefill = measure_prefill_interleaved(models, settings.prefill, settings) if settings.prefill else {}
    common = {
        plan: {
            "model": label,
            "plan": plan,
            "depth": len(decoder_layers(model)),
            "prompt": settings.prompt,
            "new": settings.new,
            "prefill_ms": prefill.get(plan, {}),
            "weight_bytes": weight_bytes_read(model),
            "kv_bytes_per_token": kv_bytes_per_token(model),
            "bandwidth_GBps": bandwidth_gbs,
        }
        for plan, model in models.items()
    }
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
                    try:
                        add_bound(record)
                    except MeasurementError as e:  # an impossible number is never reported
                        record = dict(common[plan], mode=mode, batch=batch, error=f"{type(e).__name__}: {e}")
                records.append(record)
                if on_record:
                    on_record(record)
                if progress is not None:
                    progress.update(1)
        del runners
        release_compiled_state()
    if "fused" in settings.modes:
        from ...runtime.fused import unfuse_projections

        for model in models.values():
            unfuse_projections(model)
    return records


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
