"""Running the benchmark end to end (`truedepth bench`): where models come from, which plans, the loop, the output."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ...core.loading import ModelOptions, PlanList
from ...core.plan import parse_int_ranges
from ...utils.env import environment, use_threads
from ...utils.errors import UserError, check_output_file
from ...utils.options import option, override
from ...utils.plotting import check_plotting
from ...utils.shared_options import JsonFileOption, PlotFileOption, SeedOption, ThreadsOption
from .decode import (
    MODES,
    Settings,
    add_ratios,
    allow_many_compiles,
    bench_models,
    check_settings,
    parse_modes,
    release_compiled_state,
)
from .report import format_markdown, format_table, plot, write_json
from .serving import EngineOptions
from .timing import NewTokensOption, PromptTokensOption, RepeatsOption, WarmupRunsOption, measure_bandwidth


@dataclass
class BenchMeasure:
    """What `truedepth bench` measures besides the model and plans."""

    shape: str | None = option(
        None,
        "random-weight model of a published size, no download: llama-2-7b, llama-3.2-3b, "
        "llama-3.1-8b, qwen2.5-7b, smollm2-135m (= the default model's shape), tiny",
    )
    batches: str = option("1", "batch sizes, comma-separated.", flag="--batch")
    mode: str | None = option(
        None,
        f"comma-separated from {', '.join(MODES)} (default: all on GPU; eager,fast on CPU, "
        "where compiling takes minutes)",
    )
    prefill: str | None = option(
        None,
        "prompt lengths for the prefill latency, comma-separated (default 128,512,2048 "
        "on GPU, 128,512 on CPU); 'none' to skip",
    )
    backend: str = option(
        "inductor",
        "torch.compile backend for the compiled modes ('eager' or 'aot_eager' skip code "
        "generation: for debugging only).",
    )
    markdown: bool = option(False, "print the table as markdown")
    sequential: bool = option(
        False,
        "hold one model in memory at a time (default: base and every plan together, their "
        "timed runs alternating, so load that drifts during the run affects all alike)",
    )


@dataclass  # bases in reverse order: --help lists the last base's options first
class BenchOptions(
    EngineOptions,
    BenchMeasure,
    PlotFileOption,
    JsonFileOption,
    SeedOption,
    ThreadsOption,
    WarmupRunsOption,
    RepeatsOption,
    NewTokensOption,
    PromptTokensOption,
    PlanList,
    ModelOptions,
):
    """Everything `truedepth bench` takes (see its --help); the defaults are the command's."""

    mutually_exclusive = (("model", "shape"),)
    model: str | None = override(None, default_help="the default model unless --shape is given")
    plans: list[str] | None = override(
        None,
        help_note="The base model is measured too.",
        default_help="the shape's usual plan (llama-2-7b: parallel=16:30, llama-3.2-3b: parallel=14:24, ...)",
    )
    prompt_tokens: int = override(128, flag="--prompt")
    new_tokens: int | None = override(None, flag="--new", default_help="256 on GPU, 64 on CPU")
    warmup_runs: int = override(1, help_note="(The first run of a compiled mode compiles.)")
    seed: int = override(0, help_note="of the --shape weights and the prompts.")
    json_file: str | None = override(
        None, help_note="One record per model, plan, mode and batch, rewritten after each record."
    )
    plot: str | None = override(None, help_note="Decode tokens/s per plan, mode and batch (PNG, SVG or PDF).")


def settings_from_args(args: BenchOptions, on_gpu: bool) -> Settings:
    prefill = args.prefill if args.prefill is not None else ("128,512,2048" if on_gpu else "128,512")
    return Settings(
        prompt=args.prompt_tokens,
        new=args.new_tokens if args.new_tokens is not None else (256 if on_gpu else 64),
        batches=tuple(parse_int_ranges(args.batches, "--batch", minimum=1)),
        modes=parse_modes(args.mode or (",".join(MODES) if on_gpu else "eager,fast")),
        prefill=() if str(prefill).lower() == "none" else tuple(parse_int_ranges(prefill, "--prefill", minimum=1)),
        repeats=args.repeats,
        warmup=args.warmup_runs,
        backend=args.backend,
        seed=args.seed,
    )


class Source:
    """Where models come from: a named shape (random weights) or a checkpoint; one fresh model per plan."""

    def __init__(self, args: BenchOptions, dtype: Any, device: Any) -> None:
        from ...core.shapes import get_shape, shape_config

        self.shape = get_shape(args.shape) if args.shape else None
        self.model_id = None if self.shape else (args.model or "default")
        self.dtype, self.device, self.seed = dtype, device, args.seed
        if self.shape:
            self.config = shape_config(self.shape.name)
            self.label = self.shape.name
        else:
            from transformers import AutoConfig

            from ...core.loading import resolve

            self.config = AutoConfig.from_pretrained(resolve(self.model_id), trust_remote_code=False)
            self.label = self.model_id if self.model_id != "default" else "default (SmolLM2-135M)"

    @property
    def num_layers(self) -> int:
        from ...core.arch import current_plan, transformed_record

        if transformed_record(self.config):
            raise UserError(
                f"{self.model_id} is already transformed (plan {current_plan(self.config)}); bench "
                "the original model and pass the plan with --plan."
            )
        return self.config.num_hidden_layers

    def default_plans(self) -> list[str]:
        from ...core.shapes import SHAPES

        if self.shape:
            return [self.shape.default_plan]
        for shape in SHAPES.values():  # a checkpoint with a known shape (e.g. the default model)
            c = shape.config
            if all(
                getattr(self.config, k, None) == c[k]
                for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            ):
                return [shape.default_plan]
        return []

    def build(self, plan: str) -> Any:
        from ...core.transform import apply_plan

        if self.shape:
            from ...core.shapes import build_shape

            model = build_shape(self.shape.name, self.dtype, self.device, seed=self.seed)
        else:
            from ...core.loading import load

            model, _ = load(self.model_id, dtype=self.dtype, device=self.device)
        if plan != "base":
            apply_plan(model, plan)
        return model


def resolve_plans(args: BenchOptions, source: Source) -> list[str]:
    from ...core.plan import as_plan

    given = args.plans if args.plans is not None else source.default_plans()
    plans = ["base"]
    for text in given:
        plan = as_plan(text)
        plan.validate(source.num_layers)  # a bad plan fails now, before any model is built
        if str(plan) not in plans:
            plans.append(str(plan))
    return plans


def run_bench(args: BenchOptions) -> int:
    """Build, time and report every plan as `args` says; returns the exit code (1 if every run failed)."""
    import torch

    from ...utils.device import as_dtype, device_and_dtype

    check_output_file(args.json_file, "--json")
    check_output_file(args.plot, "--plot")
    device_name, dtype_name = device_and_dtype(args.device, args.dtype)
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no GPU; use --device cpu.")
    on_gpu = device.type == "cuda"
    dtype = as_dtype(dtype_name)
    settings = settings_from_args(args, on_gpu)
    use_threads(args.threads)
    if args.plot:
        check_plotting()
    source = Source(args, dtype, device)
    check_settings(settings, getattr(source.config, "max_position_embeddings", None))
    plans = resolve_plans(args, source)
    if len(plans) == 1:
        print("note: no plan to compare; pass --plan, e.g. --plan parallel=14:24", file=sys.stderr)

    allow_many_compiles()
    meta = environment(device) | {
        "model": source.label,
        "dtype": str(dtype).replace("torch.", ""),
        "settings": {k: v for k, v in vars(settings).items() if k != "extra"},
    }
    meta["bandwidth_GBps"] = measure_bandwidth(device)
    records: list[dict[str, Any]] = []

    def save(record: dict[str, Any]) -> None:
        records.append(record)
        if args.json_file:  # rewritten after every record: an interrupted run keeps what it measured
            add_ratios(records)
            write_json(args.json_file, meta, records)

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
    print(
        f"{meta['device_name']} ({meta['device']}), {meta['dtype']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, copy bandwidth {meta['bandwidth_GBps']:.1f} GB/s; prompt {settings.prompt}, "
        f"new {settings.new}, median of {settings.repeats}"
    )
    print(format_markdown(records) if args.markdown else format_table(records))
    if args.json_file:
        write_json(args.json_file, meta, records)
        print(f"wrote {args.json_file}")
    if args.plot:
        print(f"wrote {plot(records, args.plot)}")
    failed = [r for r in records if "error" in r]
    return 1 if failed and len(failed) == len(records) else 0
