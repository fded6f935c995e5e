"""Decode speed under tensor parallelism, base model against LP plans, in one torchrun launch:
per-token latency, all-reduces per token (counted), and the share of time spent in all-reduces.

    torchrun --nproc_per_node=2 -m truedepth.cli.tp_bench --model llama-2-7b --plan base --plan parallel=16:30

Per-token latency: greedy decode with the KV cache (eager), after a prefill and warm-up steps,
timed on every rank between barriers; the slowest rank's time is reported. All-reduces per
token: counted during one decode step with PyTorch's CommDebugMode. All-reduce share: count ×
the latency of one all-reduce of a decode step's activation (batch × hidden, measured in the
same process group) / per-token latency. That latency is measured in isolation, so the share is
a model of the time on the critical path, not a trace.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.loading import ModelOptions, PlanList
from ...runtime.distributed import tp
from ...runtime.distributed.errors import TPError
from ...runtime.distributed.tp import TPOptions
from ...utils.options import option, override
from ...utils.plotting import pyplot, save_figure
from .timing import NewTokensOption, PromptTokensOption, WarmupRunsOption, synchronize

NOT_TAKEN = ("enabled", "impl")  # of the TP options: every run is sharded, --tp-impl takes several here


@dataclass  # bases in reverse order: --help lists the last base's options first
class TPBenchOptions(WarmupRunsOption, NewTokensOption, PromptTokensOption, PlanList, ModelOptions):
    """What `run_tp_bench` measures (`torchrun ... -m truedepth.cli.tp_bench --help` explains each option)."""

    model: str = override(
        "default", help_note="Also a shape (llama-2-7b, llama-3.2-3b, qwen2.5-0.5b, tiny ...): random weights."
    )
    device: str | None = override(None, help_note="(under torchrun: cuda is each rank's LOCAL_RANK GPU, cpu uses gloo)")
    plans: list[str] | None = override(
        None, default_help="base and 'auto' (a paper-like range of about 44% of the layers in pairs)"
    )
    new_tokens: int = override(32, help_note="(Decode steps, per plan.)")
    warmup_runs: int = override(4, help_note="(Here a run is one decode step.)")
    batch: int = option(1, "sequences decoded together.")
    impls: list[str] = option(
        default_factory=lambda: [tp.DEFAULT_IMPL],
        flag="--tp-impl",
        nargs="+",
        choices=tp.IMPLEMENTATIONS,
        show_default=False,
        help="TP implementation(s) to measure: dtensor (PyTorch parallelize_module), local "
        "(plain sharded weights + torch.distributed.all_reduce). "
        f"Default: {tp.DEFAULT_IMPL}",
    )
    tp: TPOptions = field(default_factory=TPOptions)  # its --tp-timeout; NOT_TAKEN: the rest
    seed: int = 0  # of the random weights and prompts
    progress: bool = True


def run_tp_bench(opts: TPBenchOptions) -> dict[str, Any]:
    """`tp_bench` with the options of the command line (plans None: base and 'auto')."""
    return tp_bench(
        opts.model,
        opts.plans or ("base", "auto"),
        impls=opts.impls,
        prompt_tokens=opts.prompt_tokens,
        new_tokens=opts.new_tokens,
        warmup=opts.warmup_runs,
        batch=opts.batch,
        dtype=opts.dtype,
        device=opts.device,
        timeout_s=opts.tp.timeout_s,
        seed=opts.seed,
        progress=opts.progress,
    )


def default_lp_plan(num_layers: int) -> str:
    """A paper-like LP range: about 44% of the layers in pairs, in the upper middle, the last 2 kept."""
    delta = max(2, 2 * round(0.22 * num_layers))
    start = max(0, min(num_layers // 2, num_layers - 2 - delta))
    return f"parallel={start}:{start + delta}"


# ---------------------------------------------------------------------------------------------
# Models: a shape (random weights) or a real checkpoint
# ---------------------------------------------------------------------------------------------
def base_config(model: Any) -> Any:
    """The config a benchmark will build, without building it (for up-front checks)."""
    from transformers import AutoConfig, PretrainedConfig

    from ...core import hf  # noqa: F401
    from ...core.loading import resolve
    from ...core.shapes import SHAPES, get_shape, shape_config

    if isinstance(model, PretrainedConfig):
        return model
    if str(model).lower() in SHAPES and str(model) != "default":
        return shape_config(get_shape(str(model)).name)
    return AutoConfig.from_pretrained(resolve(model), trust_remote_code=False)


def model_factory(model: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Callable[[], Any]:
    """A function returning a fresh copy of `model` on `device` (same weights on every rank)."""
    from transformers import PretrainedConfig

    from ...core.loading import load
    from ...core.shapes import SHAPES, build_shape, get_shape

    name = str(model).lower()
    if isinstance(model, PretrainedConfig):
        config = base_config(model)

        def build_random() -> Any:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(seed)  # same seed, same device type: same weights on every rank
            with torch.device(device):  # a copy: apply_plan edits the model's config in place
                return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype).eval()

        return build_random
    if name in SHAPES and name != "default":
        return lambda: build_shape(get_shape(name).name, dtype=dtype, device=device, seed=seed)
    return lambda: load(model, dtype=dtype, device=None)[0]  # host first: each rank moves only its shard


def _barrier(device: torch.device) -> None:
    import torch.distributed as dist

    synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _slowest(seconds: float, device: torch.device) -> float:
    """The largest value over all ranks (the step is only as fast as its slowest rank)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


@torch.no_grad()
def decode_latency(model: Any, ids: torch.Tensor, new_tokens: int, warmup: int) -> float:
    """Seconds per decode step (batch of one token per sequence, KV cache, greedy)."""
    from transformers import DynamicCache

    device = ids.device
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(warmup):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _barrier(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    synchronize(device)
    return _slowest((time.perf_counter() - start) / new_tokens, device)


@torch.no_grad()
def count_decode_all_reduces(model: Any, ids: torch.Tensor) -> tuple[int, int]:
    """(all-reduces in one prefill, all-reduces in one decode step)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with tp.AllReduceCounter() as prefill:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    with tp.AllReduceCounter() as step:
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return prefill.all_reduces, step.all_reduces


def all_reduce_latency(batch: int, hidden: int, dtype: torch.dtype, device: torch.device, iters: int = 50) -> float:
    """Median seconds of one all-reduce of a decode step's activation (batch, 1, hidden)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    x = torch.ones(batch, 1, hidden, dtype=dtype, device=device)
    for _ in range(5):
        dist.all_reduce(x)
    times = []
    for _ in range(3):  # median of 3 batches of iters: robust to one disturbed batch
        _barrier(device)
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        synchronize(device)
        times.append(_slowest((time.perf_counter() - start) / iters, device))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def tp_bench(
    model: Any = "default",
    plans: Any = ("base", "auto"),
    *,
    impls: Any = (tp.DEFAULT_IMPL,),
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    warmup: int = 4,
    batch: int = 1,
    dtype: Any = None,
    device: Any = None,
    timeout_s: float = tp.DEFAULT_TIMEOUT_S,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode latency and all-reduce share of `model` under every plan, sharded over all ranks.

    Run under torchrun (joins the process group if needed). `model`: a shape name from
    truedepth.core.shapes (random weights), "default", a hub id or folder (real weights),
    or a transformers config. `plans`: plan strings; "auto" is `default_lp_plan(L)`. `impls`: TP
    implementations to compare ("dtensor", "local"). Every plan is checked against the world size
    before any model is built. Returns the same dict on every rank; speed-ups are against "base"
    with the same implementation.
    """
    from tqdm.auto import tqdm

    from ...core.plan import as_plan
    from ...utils.device import as_dtype

    if prompt_tokens < 1 or new_tokens < 1 or warmup < 0 or batch < 1:
        raise TPError(
            "prompt_tokens, new_tokens and batch must be at least 1, warmup at least 0 "
            f"(got {prompt_tokens}, {new_tokens}, {batch}, {warmup})."
        )
    config = base_config(model)
    num_layers = config.num_hidden_layers
    plans = [default_lp_plan(num_layers) if str(p) == "auto" else str(as_plan(p)) for p in plans]
    impls = list(impls)
    for impl in impls:
        if impl not in tp.IMPLEMENTATIONS:
            raise TPError(f"unknown TP implementation {impl!r}; use one of {', '.join(tp.IMPLEMENTATIONS)}.")
    world = tp.env_world_size()
    for plan in plans:  # every plan, before any weight is built or moved
        tp.validate_tp(config, world, plan)
    mesh = tp.init_distributed(timeout_s, device)
    dev = (
        torch.device(mesh.device_type, torch.cuda.current_device())
        if mesh.device_type == "cuda"
        else torch.device("cpu")
    )
    torch_dtype = as_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    build = model_factory(model, torch_dtype, dev, seed)
    ids = torch.randint(3, config.vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(
        dev
    )

    rows = []
    with tp.explain_rank_failures(timeout_s):
        latency = all_reduce_latency(batch, config.hidden_size, torch_dtype, dev)
        runs = [(impl, plan) for impl in impls for plan in plans]
        for impl, plan in tqdm(runs, desc="tp bench", unit="run", disable=not (progress and tp.is_main())):
            rows.append(_bench_plan(build, plan, impl, ids, new_tokens, warmup, mesh, num_layers, latency))
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        base_ms = next((b["ms_per_token"] for b in rows if b["plan"] == "base" and b["impl"] == r["impl"]), None)
        r["speedup_vs_base"] = round(base_ms / r["ms_per_token"], 3) if base_ms else None
    import torch.distributed as dist

    return {
        "model": str(model) if not hasattr(model, "to_dict") else "config",
        "world_size": world,
        "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(torch_dtype).replace("torch.", ""),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "all_reduce_ms": round(latency * 1e3, 4),
        "all_reduce_bytes": batch * config.hidden_size * torch_dtype.itemsize,
        "results": rows,
    }


def _bench_plan(
    build: Callable[[], Any],
    plan: str,
    impl: str,
    ids: torch.Tensor,
    new_tokens: int,
    warmup: int,
    mesh: Any,
    num_layers: int,
    all_reduce_s: float,
) -> dict[str, Any]:
    from ...core.plan import as_plan
    from ...core.transform import apply_plan

    model = build()
    if not as_plan(plan).is_identity:
        apply_plan(model, plan)
    tp.parallelize_tp(model, mesh, impl)
    prefill_count, step_count = count_decode_all_reduces(model, ids)
    seconds = decode_latency(model, ids, new_tokens, warmup)
    depth = len(model.model.layers)
    del model
    return {
        "impl": impl,
        "plan": plan,
        "depth": depth,
        "original_layers": num_layers,
        "all_reduces_per_token": step_count,
        "all_reduces_prefill": prefill_count,
        "expected_all_reduces": tp.expected_all_reduces(depth),
        "ms_per_token": round(seconds * 1e3, 3),
        "tokens_per_s": round(1.0 / seconds, 2),
        "all_reduce_share": round(min(1.0, step_count * all_reduce_s / seconds), 4),
    }


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"TP{result['world_size']} decode ({result['backend']}, {result['device']}, {result['dtype']}, batch "
        f"{result['batch']}, {result['prompt_tokens']}-token prompt, {result['new_tokens']} timed tokens); "
        f"one all-reduce of {result['all_reduce_bytes']} bytes: {result['all_reduce_ms']:.3f} ms"
    )
    lines = [
        head,
        f"{'impl':<8} {'plan':<24} {'depth':>5} {'all-red/tok':>11} {'ms/token':>9} {'tok/s':>8} {'AR share':>8} "
        f"{'speedup':>7}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['impl']:<8} {r['plan']:<24} {r['depth']:>5} {r['all_reduces_per_token']:>11} "
            f"{r['ms_per_token']:>9.2f} {r['tokens_per_s']:>8.1f} {r['all_reduce_share']:>8.1%} "
            f"{r['speedup_vs_base'] or float('nan'):>6.2f}x"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Any) -> Path:
    """Stacked bars: ms/token split into all-reduce time (modelled) and the rest, per plan."""
    plt = pyplot()
    rows = result["results"]
    names = [f"{r['plan']}\n({r['impl']})" for r in rows]
    ar = [r["ms_per_token"] * r["all_reduce_share"] for r in rows]
    rest = [r["ms_per_token"] - a for r, a in zip(rows, ar)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    ax.bar(names, rest, label="compute + other")
    ax.bar(names, ar, bottom=rest, label="all-reduces (count × measured latency)")
    ax.set_ylabel("ms per token")
    ax.set_title(f"TP{result['world_size']} decode, {result['model']} ({result['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=120)
    return path
