"""The stages of `truedepth compress` and their records, from which a rerun resumes.

search -> generate -> finetune -> evaluate -> save, each built on the public functions of apps.search,
apps.finetune and measure. Each finished stage is recorded in `DIR/stages/<stage>.json` (written atomically)
with the options that produced it. A rerun skips finished stages whose options are unchanged, refuses to go on
when an option a finished stage used has changed (naming the option and the stage), and resumes an
interrupted generation or fine-tune where it stopped (finished parts of generated text, the fine-tune's latest
checkpoint in `DIR/finetune`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ...measure.eval.heldout import EvalTextOptions
from ...utils.errors import UserError
from ...utils.io import atomic_write_json
from ...utils.options import fill, flag_of, option_names
from ..finetune import SUMMARY_FILE as FT_SUMMARY_FILE
from ..finetune import FinetuneOptions, generate_text, latest_checkpoint, mix_texts, read_generated, run_finetune
from ..search import SearchOptions, run_search
from .budget import BUDGET_SHARES
from .options import (
    DEFAULT_OPTIONS,
    FIDELITY_TOKENS,
    FINETUNE_DIR,
    GENERATED_DIR,
    STAGE_DIR,
    STAGE_INPUTS,
    STAGES,
    TRAIN_FILE,
    CompressOptions,
)

# compress options of the same name that are not the fine-tune's: it measures nothing (the evaluate stage
# does), and --overwrite has already emptied DIR
NOT_FOR_FINETUNE = (*option_names(EvalTextOptions), "overwrite")


class FinetuneStopped(UserError):
    """The fine-tune stopped before its end (not by its time limit): the same command resumes it."""


# =============================================================================================
# Stage records
# =============================================================================================
def stage_inputs(opts: CompressOptions, stage: str) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in STAGE_INPUTS[stage]}


def stage_path(out: Path, stage: str) -> Path:
    return out / STAGE_DIR / f"{stage}.json"


def read_stage(out: Path, stage: str) -> dict[str, Any] | None:
    path = stage_path(out, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def write_stage(out: Path, stage: str, opts: CompressOptions, seconds: float, result: dict[str, Any]) -> dict:
    record = {
        "stage": stage,
        "inputs": stage_inputs(opts, stage),
        "seconds": round(seconds, 2),
        "budget_seconds": round(opts.budget_minutes * 60 * BUDGET_SHARES[stage], 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "result": result,
    }
    atomic_write_json(stage_path(out, stage), record)
    return record


# Stages that only measure, and that nothing later depends on: other options measure them again, not refused
REMEASURED = ("serve",)


def changed_inputs(record: dict[str, Any], opts: CompressOptions, stage: str) -> Iterator[tuple[str, Any, Any]]:
    """(option, value the stage used, value now) for each input of `stage` that differs now."""
    for key, now in stage_inputs(opts, stage).items():
        # A stage recorded before an option existed ran as that option's default does.
        was = record["inputs"].get(key, getattr(DEFAULT_OPTIONS, key))
        if was != now:
            yield key, was, now


def finished_stage(out: Path, stage: str, opts: CompressOptions) -> dict[str, Any] | None:
    """The record of `stage` if it finished with the options of this run (a remeasured stage may differ)."""
    record = read_stage(out, stage)
    if record is not None and stage in REMEASURED and any(changed_inputs(record, opts, stage)):
        return None
    return record


def check_unchanged(out: Path, opts: CompressOptions) -> None:
    """Refuse options that differ from those a finished stage used (its result would be stale)."""
    for stage in STAGES:
        record = read_stage(out, stage)
        if record is None or stage in REMEASURED:
            continue
        for key, was, now in changed_inputs(record, opts, stage):
            raise UserError(
                f"{flag_of(CompressOptions, key)} is {now!r} but the finished stage '{stage}' in {out} used "
                f"{was!r}; rerun with the same options to resume, pass --overwrite to start over, "
                "or choose another --out."
            )


# =============================================================================================
# The stages
# =============================================================================================
def contiguous_plan(layers: int, depth: int) -> str | None:
    """The paper's scheme at `depth`: one contiguous range of pairs, ending two layers below the top.

    On the default model the best contiguous range on calibration text ends there at every depth
    from 28 to 22 (docs/SEARCH.md). None when pairs cannot reach `depth`.
    """
    width = 2 * (layers - depth)
    if width > layers:
        return None
    start = max(0, layers - 2 - width)
    return f"parallel={start}:{start + width}"


def load_model(opts: CompressOptions, folder: Path | None = None, plan: str | None = None) -> tuple[Any, Any]:
    """--model (or a saved `folder`) in --dtype on --device, with `plan` applied."""
    from ...core.loading import load
    from ...utils.device import as_dtype, device_and_dtype

    device, dtype_name = device_and_dtype(opts.device, opts.dtype)
    return load(folder or opts.model, dtype=as_dtype(dtype_name), device=device, plan=plan)


def run_search_stage(opts: CompressOptions) -> dict[str, Any]:
    """`truedepth search` at --target-depth, calibrated on --data, with the search's own defaults otherwise."""
    from ...core.plan import as_plan

    summary = run_search(
        fill(
            SearchOptions,
            opts,
            target_depth=str(opts.target_depth),
            calib=opts.data,
            report="none",
            out=None,
            plot=None,
        )
    )
    found = summary["found"][0]
    return {
        "plan": found["plan"],
        "plan_string": str(as_plan(found["plan"])),
        "depth": found["depth"],
        "summary": summary,
    }


def run_generate_stage(opts: CompressOptions, out: Path, max_seconds: float) -> dict[str, Any]:
    """Text the base model samples itself (data-free distillation) or its answers to questions
    (self-distillation), in resumable parts under DIR/generated."""
    if not opts.generate_tokens:
        return {"tokens": 0, "parts": 0, "seconds": 0.0, "stopped_by": None}
    model, tokenizer = load_model(opts)
    return generate_text(
        model,
        tokenizer,
        out / GENERATED_DIR,
        opts.generate_tokens,
        max_seconds=max_seconds,
        progress=not opts.quiet,
        source=opts.generate_from,
    ) | {"max_seconds": round(max_seconds, 1)}


def training_data(opts: CompressOptions, out: Path) -> str:
    """The fine-tune's --data: --data itself, or DIR/train.txt, generated text mixed with evenly spaced
    chunks of --data."""
    from ...measure.eval.data import training_text_for
    from ...utils.io import atomic_write

    if opts.corpus_share >= 1:
        return opts.data
    text = mix_texts(read_generated(out / GENERATED_DIR), training_text_for(opts.data), opts.corpus_share)
    path = out / TRAIN_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write(path, text)
    return str(path)


def run_finetune_stage(opts: CompressOptions, out: Path, plan: str, max_minutes: float) -> dict[str, Any]:
    folder = out / FINETUNE_DIR
    summary_file = folder / FT_SUMMARY_FILE
    resume = latest_checkpoint(folder) is not None
    if summary_file.is_file() and not resume:
        print(f"finetune: {folder} already holds the fine-tuned model; using it")  # stopped before its record
    else:
        data = training_data(opts, out)
        if resume:
            print(f"finetune: resuming from {latest_checkpoint(folder)}")
        # the evaluate stage measures every model on the same texts, so the fine-tune only trains; on resume
        # (and when fitted to the time) --tokens stays at the fine-tune's default: the checkpoint's count holds
        tokens = opts.tokens if opts.tokens is not None and not resume else FinetuneOptions.tokens
        rc = run_finetune(
            fill(
                FinetuneOptions,
                opts,
                exclude=NOT_FOR_FINETUNE,
                plan=plan,
                data=data,
                tokens=tokens,
                fit_tokens=opts.tokens is None,
                max_minutes=max_minutes,
                out=str(folder),
                resume=resume,
                no_eval=True,
            )
        )
        if rc != 0:
            raise FinetuneStopped(
                f"the fine-tune in {folder} stopped before its end; rerun the same command to resume it."
            )
    summary = json.loads(summary_file.read_text())
    keep = (
        "steps",
        "tokens",
        "finished",
        "stopped_by",
        "train_seconds",
        "tokens_per_second",
        "loss",
        "train_dtype",
        "history",
        "epochs",
    )
    return {k: summary.get(k) for k in keep} | {"max_minutes": round(max_minutes, 3)}


def measured_perplexities(
    opts: CompressOptions, texts: dict[str, str], label: str, plan: str | None = None, folder: Path | None = None
) -> dict[str, float]:
    """Perplexity of one model on each text. Models without training (base, a plan applied to the base)
    come from finetune's cache when measured before with the same weights, texts and sizes, without
    loading them."""
    from ...measure.eval.heldout import cached_perplexities, perplexities, texts_digest
    from ...utils.device import as_dtype, device_and_dtype

    device, dtype_name = device_and_dtype(opts.device, opts.dtype)
    dtype = as_dtype(dtype_name)

    def measure() -> dict[str, float]:
        model, tokenizer = load_model(opts, folder, plan)
        return perplexities(model, tokenizer, texts, opts.eval_tokens, opts.eval_window, device, dtype, not opts.quiet)

    if folder is not None:
        return measure()
    return cached_perplexities(
        measure, opts.model, label, texts_digest(texts), opts.eval_tokens, opts.eval_window, dtype, device
    )


def fidelity_tokens(opts: CompressOptions) -> int:
    return min(opts.eval_tokens, FIDELITY_TOKENS) if opts.fidelity_tokens is None else opts.fidelity_tokens


def measured_fidelity(
    opts: CompressOptions,
    texts: dict[str, str],
    base: Any,
    tokenizer: Any,
    label: str,
    plan: str | None = None,
    model: Any = None,
) -> dict[str, dict[str, Any]]:
    """Top-1 agreement with `base`, KL divergence from it and both perplexities, of `model` (or of `plan` applied
    to the base) on the first --fidelity-tokens tokens of each text. A plan's model is loaded next to the base
    only on a miss of finetune's cache (like measured_perplexities), and dropped when measured."""
    from ...measure.eval.fidelity import fidelity
    from ...measure.eval.heldout import cached_perplexities, texts_digest
    from ...utils.device import as_dtype, autocast, device_and_dtype

    tokens = fidelity_tokens(opts)
    if not tokens:
        return {}
    device, dtype_name = device_and_dtype(opts.device, opts.dtype)
    dtype = as_dtype(dtype_name)

    def measure(compared: Any) -> dict[str, dict[str, Any]]:
        with autocast(device, dtype):
            return {
                name: fidelity(
                    base, compared, tokenizer, text, tokens=tokens, window=opts.eval_window, progress=not opts.quiet
                )
                for name, text in texts.items()
            }

    if model is not None:
        return measure(model)
    return cached_perplexities(
        lambda: measure(load_model(opts, plan=plan)[0]),
        opts.model,
        f"fidelity {label}",
        texts_digest(texts),
        tokens,
        opts.eval_window,
        dtype,
        device,
    )


def run_evaluate_stage(opts: CompressOptions, out: Path, layers: int, plan: str) -> dict[str, Any]:
    """Perplexity of the base model, the paper's contiguous plan, the searched plan (both without training) and
    the fine-tuned model on the same texts, and their fidelity to the base model; the lm-eval tasks; MMLU-chat
    choice agreement and decode speed of base and compressed model. At most two models are loaded at a time."""
    from ...measure.bench.speed import interleaved_decode_rates
    from ...measure.eval.heldout import measuring_texts

    texts = measuring_texts(opts)
    contiguous = contiguous_plan(layers, opts.target_depth)
    measured = {
        "base": measured_perplexities(opts, texts, "base"),
        "contiguous": measured_perplexities(opts, texts, contiguous, plan=contiguous) if contiguous else {},
        "searched": measured_perplexities(opts, texts, plan, plan=plan),
        "fine-tuned": measured_perplexities(opts, texts, "fine-tuned", folder=out / FINETUNE_DIR),
    }
    ppl = {name: {model: values.get(name) for model, values in measured.items()} for name in texts}
    base, tokenizer = load_model(opts)
    fidelity: dict[str, dict] = {}
    for name, measured_plan in (("contiguous", contiguous), ("searched", plan)):  # next to the base, in turn
        fidelity[name] = (
            measured_fidelity(opts, texts, base, tokenizer, measured_plan, plan=measured_plan) if measured_plan else {}
        )
    compressed, _ = load_model(opts, out / FINETUNE_DIR)
    fidelity["fine-tuned"] = measured_fidelity(opts, texts, base, tokenizer, "fine-tuned", model=compressed)
    models = {"base": base, "fine-tuned": compressed}
    speed = interleaved_decode_rates(models, tokenizer, new_tokens=opts.decode_tokens, progress=not opts.quiet)
    result: dict[str, Any] = {
        "contiguous_plan": contiguous,
        "perplexity": ppl,
        "eval_tokens": opts.eval_tokens,
        "eval_window": opts.eval_window,
        "decode_tokens_per_second": speed,
        "depth": {"base": layers, "fine-tuned": compressed.config.num_hidden_layers},
    }
    if fidelity_tokens(opts):
        result["fidelity"] = {name: {model: values.get(name) for model, values in fidelity.items()} for name in texts}
        result["fidelity_tokens"] = fidelity_tokens(opts)
    if opts.mmlu_chat:
        from ...measure.eval.fidelity import mmlu_chat_agreement

        result["mmlu_chat"] = mmlu_chat_agreement(base, compressed, tokenizer, opts.mmlu_chat, progress=not opts.quiet)
    if opts.tasks:
        from ...measure.eval.evaluate import EvalOptions, run_tasks

        task_opts = EvalOptions(tasks=opts.tasks, limit=opts.limit, num_fewshot=opts.num_fewshot)
        result["tasks"] = {name: run_tasks(m, tokenizer, task_opts) for name, m in models.items()}
    return result


def run_save_stage(out: Path) -> dict[str, Any]:
    """Put the fine-tuned model and its tokenizer at the top of DIR (hard links: no second copy)."""
    folder = out / FINETUNE_DIR
    linked = []
    for src in sorted(folder.iterdir()):
        if src.is_file() and src.name != FT_SUMMARY_FILE:
            dst = out / src.name
            tmp = out / f".{src.name}.{os.getpid()}.tmp"
            try:
                os.link(src, tmp)
            except OSError:  # another file system: a copy
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
            linked.append(src.name)
    return {"files": linked}


ENGINE_FILE = "engine_bench.json"  # the serve stage's measurements, as `bench --engine` writes them


def engine_bench_options(opts: CompressOptions, out: Path) -> Any:
    """`bench --engine`'s options for the serve stage: the base model against the saved folder `out`."""
    from ...measure.bench.benchmark import BenchOptions

    return fill(
        BenchOptions, opts, plans=[str(out)], json_file=str(out / ENGINE_FILE), prompt_tokens=128, new_tokens=64
    )


def rerun_engine_command(opts: CompressOptions, out: Path) -> str:
    """The `truedepth bench` command that measures the same thing again, for the model card."""
    extra = f" --tensor-parallel-size {opts.tensor_parallel_size}" if opts.tensor_parallel_size != 1 else ""
    if opts.engine == "llama.cpp" and opts.gguf_type != "f32":
        extra += f" --gguf-type {opts.gguf_type}"
    return (
        f"truedepth bench --engine {opts.engine} --model {opts.model} --plan {out} --concurrency {opts.concurrency} "
        f"--prompt 128 --new 64{extra} --json {ENGINE_FILE}"
    )


def run_serve_stage(opts: CompressOptions, out: Path) -> dict[str, Any]:
    """With --engine vllm or llama.cpp: the saved model and the base model served by that engine, under load."""
    if opts.engine == "transformers":
        return {"engine": "transformers"}  # nothing to do: the evaluate stage measured transformers' speed
    from ...deploy.engine_bench import measure_engine

    results = measure_engine(engine_bench_options(opts, out))
    label = next(m["model"] for m in results["models"] if m["model"] != "base")
    summary = [dict(row, model="compressed" if row["model"] == label else row["model"]) for row in results["summary"]]
    return {
        "engine": results["engine"],
        "engine_version": results["engine_version"],
        "settings": results["settings"],
        "summary": summary,
        "command": rerun_engine_command(opts, out),
        "file": ENGINE_FILE,
    }


def options_record(opts: CompressOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(opts).items() if k not in ("quiet", "command")}
