"""Everything `truedepth compress` can refuse before any work: the options, the target depth against the
model's config.json, the output folder, and (budget.py) a budget the search alone would use up."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ...core.arch import transformed_record
from ...utils.errors import OutputPathError, UserError
from ..finetune import TrainConfig
from ..search import SearchOptions, max_reduction
from .options import STAGE_DIR, CompressOptions


def check_target_depth(config: Any, depth: int | None, model: str) -> int:
    """The model's depth; raises unless 1 <= depth < model depth and the search can reach it."""
    record = transformed_record(config)
    if record:
        raise UserError(
            f"{model} is already transformed (plan {record['plan']}); pass the original "
            "model: the search and the distillation teacher need its layers."
        )
    layers = config.num_hidden_layers
    if depth is None:
        raise UserError(f"give --target-depth D with 1 <= D < {layers} (the depth of {model}).")
    lowest = layers - max_reduction(layers, SearchOptions.max_group, SearchOptions.allow_skip)
    if not 1 <= depth < layers:
        raise UserError(
            f"--target-depth {depth} is out of range: {model} has {layers} layers, so pass "
            f"{max(lowest, 1)} <= D <= {layers - 1}."
        )
    if depth < lowest:
        raise UserError(
            f"--target-depth {depth} is below what groups of up to {SearchOptions.max_group} layers "
            f"reach on {layers} layers; pass --target-depth {lowest} or more."
        )
    return layers


def check_options(opts: CompressOptions) -> None:
    """The options alone (no model): sizes, the generated-text share, the texts, the fine-tune's own checks.
    Sets --corpus-share's default (1 alone, 0.5 with generated text)."""
    from ...measure.bench.precision import check_search_dtype
    from ...measure.eval.data import text_parts

    positive = {
        "eval_tokens": opts.eval_tokens,
        "eval_window": opts.eval_window,
        "calib_windows": opts.calib_windows,
        "calib_length": opts.calib_length,
        "decode_tokens": opts.decode_tokens,
    }
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
    if opts.generate_tokens < 0:
        raise UserError(f"--generate-tokens must be 0 (no generated text) or more (got {opts.generate_tokens}).")
    if opts.corpus_share is None:
        opts.corpus_share = 0.5 if opts.generate_tokens else 1.0
    if not 0 <= opts.corpus_share <= 1:
        raise UserError(
            f"--corpus-share is the share of --data in the fine-tuning text, in [0, 1] (got {opts.corpus_share})."
        )
    if opts.generate_tokens == 0 and opts.corpus_share < 1:
        raise UserError(
            f"--corpus-share {opts.corpus_share:g} asks for generated text but --generate-tokens is 0; "
            "pass --corpus-share 1 to fine-tune on --data alone, or --generate-tokens N."
        )
    if opts.generate_tokens and opts.corpus_share == 1:
        raise UserError(
            "--corpus-share 1 fine-tunes on --data alone, so generated text would go unused; pass "
            "--generate-tokens 0 as well."
        )
    if not opts.budget_minutes > 0:
        raise UserError(f"--budget-minutes must be positive (got {opts.budget_minutes}).")
    if opts.eval_tokens < opts.eval_window:
        raise UserError(f"--eval-tokens ({opts.eval_tokens}) must be at least one --eval-window ({opts.eval_window}).")
    if opts.fidelity_tokens and opts.fidelity_tokens < opts.eval_window:
        raise UserError(
            f"--fidelity-tokens ({opts.fidelity_tokens}) must be 0 (no comparison with the base model) or at least "
            f"one --eval-window ({opts.eval_window})."
        )
    if opts.mmlu_chat:
        from ...measure.eval.fidelity import mmlu_chat_questions

        mmlu_chat_questions(opts.mmlu_chat)  # a count out of range, or MMLU not installed: refused here
    # a '+' spec joins texts: none of its parts may be a measuring text
    if {opts.data, *text_parts(opts.data)} & {opts.eval_text, opts.other_text}:
        raise UserError(
            f"--data {opts.data!r} is also a text the result is measured on; train and calibrate on "
            "other text (the default austen-train+fortunes never overlaps either measuring text)."
        )
    check_search_dtype(opts.search_dtype)
    # the fine-tune's own checks (--lr, --seq-len, --neighbours with --loss blocks, ...): here, not after the search
    TrainConfig(
        **{
            k: getattr(opts, k)
            for k in (
                "loss",
                "seq_len",
                "batch_size",
                "lr",
                "neighbours",
                "train_last",
                "checkpoint_every",
                "block_weight",
                "warmup",
                "lora_rank",
            )
        },
        tokens=1 if opts.tokens is None else opts.tokens,
    ).validate()  # None: fitted to the time left
    from ...measure.eval.evaluate import check_task_options, task_list

    if opts.tasks is not None and not task_list(opts.tasks):
        raise UserError("--tasks is empty; pass task names separated by commas, e.g. --tasks truedepth_mmlu.")
    check_task_options(opts.tasks, opts.num_fewshot, opts.limit)


def check_output(out: Path, overwrite: bool) -> None:
    """An output folder is new, empty, an earlier compress run of its own, or replaced by --overwrite."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file; pass a folder.")
    if not out.is_dir() or not any(out.iterdir()) or (out / STAGE_DIR).is_dir() or overwrite:
        return
    raise OutputPathError(
        f"--out {out} holds something other than a compress run; pass --overwrite to replace it, "
        "or choose another --out."
    )


def check_engine(opts: CompressOptions) -> None:
    """--engine vllm / llama.cpp: its options and its programs, before the first stage (the serve stage is last)."""
    if opts.engine == "transformers":
        return
    from ...deploy.engines import engine_for
    from ...measure.bench.serving import check_engine_options
    from .stages import engine_bench_options

    bench = engine_bench_options(opts, Path(opts.out))
    check_engine_options(dataclasses.replace(bench, json_file=None))  # DIR is made after the checks
    engine_for(opts.engine).check_installed()


def check_chat_generation(opts: CompressOptions) -> None:
    """--generate-from chat: the tokenizer has a chat template and the question material is fetched."""
    if not opts.generate_tokens or opts.generate_from != "chat":
        return
    from ...core.loading import load_tokenizer, resolve
    from ..finetune import check_chat_template, question_pools

    check_chat_template(load_tokenizer(opts.model, resolve(opts.model)))
    question_pools()


def check_inputs(opts: CompressOptions) -> tuple[Any, str]:
    """Everything that can be refused before any work: returns (the model's config, device)."""
    from ...core.loading import read_config
    from ...utils.device import device_and_dtype
    from .budget import check_budget
    from .stages import read_stage

    if not opts.out:
        raise UserError("give --out DIR, the folder that will hold the compressed model.")
    check_options(opts)
    config = read_config(opts.model)
    check_target_depth(config, opts.target_depth, opts.model)
    check_output(Path(opts.out), opts.overwrite)
    check_budget(opts, config, searched=read_stage(Path(opts.out), "search") is not None and not opts.overwrite)
    check_engine(opts)
    check_chat_generation(opts)
    device, _ = device_and_dtype(opts.device, opts.dtype)
    return config, device
