"""A fine-tune end to end (`truedepth finetune`): checks, resuming, the student and teacher, training, the
final model, saving and the summary."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ...core.arch import original_depth, recorded_widths, transformed_record
from ...core.plan import PlanError
from ...measure.bench.precision import training_precision
from ...measure.eval.data import training_text_for
from ...measure.eval.heldout import cached_perplexities, measuring_texts, perplexities, texts_digest
from ...utils.env import use_threads
from ...utils.errors import InputPathError, OutputPathError, UserError, check_output_dir
from ...utils.options import default_of, fill, flag_of
from .blockloss import BlockMatch, check_one_attention_type
from .calibrate import calibrate_model, fold
from .checkpoint import latest_checkpoint
from .config import (
    CHECKPOINT_DIR,
    DEFAULT_LOSS,
    DEFAULT_PLAN,
    DTYPE_NAMES,
    RUN_OPTIONS,
    SUMMARY_FILE,
    TEACHER_LOSSES,
    TRAJECTORY_OPTIONS,
    FinetuneOptions,
    TrainConfig,
)
from .model import (
    Teacher,
    add_lora,
    build_student,
    cast_frozen,
    check_memory,
    check_plan_has_parallel_groups,
    freeze_all_but,
    shared_prefix_length,
    trainable_layer_indices,
    unique_parameters,
    wide_members,
)
from .report import print_summary, summarise, write_summary
from .train import TokenBatches, time_training_step, tokenize_text, train, trainable_state

FIT_MARGIN = 0.93  # of the time limit planned for steps: checkpoints and slower steps take the rest


def config_from_args(args: FinetuneOptions) -> TrainConfig:
    """The run's training options as TrainConfig (the record of its trajectory)."""
    return fill(TrainConfig, args, loss=args.loss or DEFAULT_LOSS, eval_every=0 if args.no_eval else args.eval_every)


def given(args: FinetuneOptions, name: str) -> bool:
    """Whether option `name` differs from its default (an option left at its default counts as omitted)."""
    return getattr(args, name) != default_of(FinetuneOptions, name)


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber another run's checkpoints or a finished run."""
    check_output_dir(out, "--out")
    if resume:
        if latest_checkpoint(out) is None:
            hint = " (it holds a finished run)" if (out / SUMMARY_FILE).exists() else ""
            raise InputPathError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}{hint}; run without --resume.")
        return
    if latest_checkpoint(out) is not None:
        raise OutputPathError(
            f"{out} holds checkpoints of an unfinished run; pass --resume to continue it, or choose another --out."
        )
    if (out / SUMMARY_FILE).exists() and not overwrite:
        raise OutputPathError(
            f"{out} already holds a fine-tuned model; pass --overwrite to replace it, or choose another --out."
        )
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY_FILE).exists() and not overwrite:
        raise OutputPathError(
            f"--out {out} is a folder with other files in it (not a truedepth fine-tune run); "
            "the model would replace its config.json and weights. Choose a new or empty folder, "
            "or pass --overwrite."
        )


def resolve_resume_options(args: FinetuneOptions, out: Path) -> None:
    """On --resume, omitted options (those at their default) take the checkpoint's values; given ones must
    match them."""
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    saved = dict(state["trajectory"], **state.get("options", {}))
    chosen = {k: getattr(args, k) for k in TRAJECTORY_OPTIONS + RUN_OPTIONS if given(args, k)}
    clash = [
        f"{flag_of(FinetuneOptions, k)} {v!r} (checkpoint: {saved[k]!r})"
        for k, v in chosen.items()
        if k in saved and saved[k] != v
    ]
    if clash:
        raise UserError(
            "--resume: " + ", ".join(clash) + " differ from the checkpoint; drop them to continue the "
            "same run, or start a new --out."
        )
    for k, v in saved.items():
        setattr(args, k, v)


def run_finetune(args: FinetuneOptions) -> int:
    """Fine-tune, save and summarise as `args` says; returns the exit code (1: training did not finish)."""
    from ...core.plan import as_plan

    out = Path(args.out)
    prepare_output(out, args.resume, args.overwrite)
    if args.resume:
        resolve_resume_options(args, out)
    cfg = config_from_args(args)
    cfg.validate()
    if args.fit_tokens and not args.resume and (args.max_minutes is None or given(args, "tokens")):
        raise UserError("--fit-tokens sets --tokens from the time limit: pass --max-minutes, and not --tokens.")
    use_threads(args.threads)
    device, dtype, train_dtype = training_precision(args.device, args.dtype, args.train_dtype)
    cfg.train_dtype = DTYPE_NAMES[train_dtype]
    if args.plan is not None and not as_plan(args.plan).is_identity:
        check_plan_has_parallel_groups(args.plan)  # before loading anything
    check_config_before_loading(args, cfg)
    progress = not args.quiet
    texts = load_texts(args)  # before the model: a bad --data fails fast

    setup = prepare_models(args, cfg, device, dtype)
    data = TokenBatches(tokenize_text(setup.tokenizer, texts.pop("train")), cfg.seq_len, cfg.batch_size, cfg.seed)
    meta: dict[str, Any] = {
        "plan": str(setup.plan),
        "options": dict({k: getattr(args, k) for k in RUN_OPTIONS}, dtype=DTYPE_NAMES[dtype]),
    }
    measure = _measurer(setup.tokenizer, texts, args, device, dtype, progress)
    if not args.resume and measure:  # base and LP, in the evaluation dtype, before any weight changes
        digest = texts_digest(texts)
        if setup.base is not None:
            meta["base"] = cached_perplexities(
                partial(measure, setup.base),
                args.model,
                "base",
                digest,
                args.eval_tokens,
                args.eval_window,
                dtype,
                device,
            )
        else:
            meta["base"] = None
        meta["lp"] = cached_perplexities(
            partial(measure, setup.student),
            args.model,
            str(setup.plan),
            digest,
            args.eval_tokens,
            args.eval_window,
            dtype,
            device,
        )

    model, teacher = make_trainable(setup, cfg, train_dtype)
    memory = check_memory(model, teacher.model if teacher else None, cfg, device, train_dtype)
    if args.fit_tokens and not args.resume:
        fit_tokens_to_minutes(model, teacher, data, cfg, device, train_dtype)
    _report_setup(args, cfg, setup, model, data, memory, train_dtype)
    curve_eval = None
    if cfg.eval_every and measure:
        curve_eval = _measurer(setup.tokenizer, {"held_out": texts["held_out"]}, args, device, train_dtype, False)
    result = train(
        model,
        teacher,
        data,
        cfg,
        out,
        device,
        train_dtype,
        resume=args.resume,
        evaluate=curve_eval,
        meta=meta,
        progress=progress,
    )
    meta = result.resumed_meta  # type: ignore[attr-defined]
    if not result.finished and result.stopped_by != "max_minutes":
        return 1
    trained = {k: v.detach().float().cpu() for k, v in trainable_state(model).items()}
    del model, teacher, setup  # the final model is rebuilt from the original weights in --dtype
    final, tokenizer = final_model(args, cfg, trained, device, dtype)
    save_model(final, tokenizer, out)
    summary = summarise(
        args, cfg, meta["plan"], result, meta, measure(final) if measure else None, device, dtype, train_dtype, data
    )
    write_summary(summary, out)
    if result.finished and not args.keep_checkpoints_after:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    print_summary(summary, out)
    return 0


def check_config_before_loading(args: FinetuneOptions, cfg: TrainConfig) -> None:
    """The plan and the loss against --model's config.json (no weights read); a transformed model keeps
    its own plan."""
    from ...core.loading import check_plan_against_config, read_config
    from ...core.plan import as_plan

    config = read_config(args.model)
    if transformed_record(config) is None:
        check_plan_against_config(as_plan(args.plan or DEFAULT_PLAN), config)
    if cfg.loss == "blocks" or cfg.block_weight:
        check_one_attention_type(config)


@dataclass
class Setup:
    student: Any  # the transformed model (trained layers still untouched)
    base: Any | None  # the model before the plan (None for an already transformed --model)
    tokenizer: Any
    plan: Any
    trained_layers: list[int]
    split: int  # leading layers student and teacher share


def prepare_models(args: FinetuneOptions, cfg: TrainConfig, device: Any, dtype: torch.dtype) -> Setup:
    """Load --model in the evaluation dtype and build the student (sharing frozen weights with the base)."""
    from ...core.loading import load
    from ...core.plan import as_plan

    print(f"loading {args.model} ...", file=sys.stderr)
    base, tokenizer = load(args.model, dtype=dtype, device=device)
    recorded = transformed_record(base.config)
    if recorded is not None:
        plan = _already_transformed(args, cfg, recorded)
        trained = trainable_layer_indices(recorded_widths(base.config), cfg.neighbours, cfg.train_last)
        return Setup(base, None, tokenizer, plan, trained, 0)
    return student_setup(base, tokenizer, as_plan(args.plan or DEFAULT_PLAN), cfg)


def student_setup(base: Any, tokenizer: Any, plan: Any, cfg: TrainConfig) -> Setup:
    """The student `plan` makes of `base` (sharing its frozen weights), the layers that train in it, and the
    leading layers it shares with the teacher."""
    check_plan_has_parallel_groups(plan)
    student = build_student(base, plan, cfg.neighbours, cfg.train_last)
    trained = trainable_layer_indices(recorded_widths(student.config), cfg.neighbours, cfg.train_last)
    split = shared_prefix_length(plan.blocks(recorded_depth(student)), trained)
    return Setup(student, base, tokenizer, plan, trained, split)


def fit_tokens_to_minutes(
    model: Any, teacher: Teacher | None, data: TokenBatches, cfg: TrainConfig, device: Any, train_dtype: torch.dtype
) -> None:
    """Set `cfg.tokens` so that the schedule's last step falls inside `cfg.max_minutes` at the measured speed.

    A run stopped by its time limit in the middle of the cosine schedule ends at a high learning rate;
    one that finishes early leaves time unused. The resumed run reads the same number back from its
    checkpoint, so the trajectory stays one.
    """
    if cfg.max_minutes is None:
        raise UserError("fitting --tokens to the time limit needs --max-minutes.")
    seconds = time_training_step(model, teacher, data.batch(0).to(device), cfg, device, train_dtype)
    steps = max(1, int(FIT_MARGIN * cfg.max_minutes * 60 / seconds))
    cfg.tokens = steps * cfg.tokens_per_step
    print(
        f"one training step takes {seconds:.2f} s here, so {steps} steps ({cfg.tokens:,} tokens) fit in "
        f"--max-minutes {cfg.max_minutes:.1f} ({FIT_MARGIN:.0%} of it, leaving room for checkpoints)"
    )


def recorded_depth(model: Any) -> int:
    return original_depth(model.config)


def make_trainable(setup: Setup, cfg: TrainConfig, train_dtype: torch.dtype) -> tuple[Any, Teacher | None]:
    """Freeze all but the trained layers (or add LoRA adapters); fp32 master copies of what trains,
    `train_dtype` for everything frozen; the distillation teacher when needed."""
    from ...core.arch import decoder_layers

    freeze_all_but(setup.student, setup.trained_layers, head=cfg.train_last > 0)
    model = add_lora(setup.student, setup.trained_layers, cfg.lora_rank, cfg.lora_alpha) if cfg.lora else setup.student
    if cfg.calibrate != "none":
        calibrate_model(model, cfg.calibrate, cfg.weights_train)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # master copy: AdamW updates are lost in bf16
    teacher = None
    if cfg.loss in TEACHER_LOSSES:
        # --loss blocks never asks for the teacher's logits, so it needs no hook at the split
        teacher = Teacher(setup.base, decoder_layers(setup.student), 0 if cfg.loss == "blocks" else setup.split)
        if cfg.loss == "blocks" or cfg.block_weight:  # one attention type: checked before loading
            teacher.blocks = BlockMatch(
                decoder_layers(setup.student),
                decoder_layers(setup.base),
                wide_members(setup.plan, recorded_depth(setup.student)),
                local=cfg.loss == "blocks",
            )
    cast_frozen([model, teacher.model if teacher else None], train_dtype)
    return model, teacher


def final_model(
    args: FinetuneOptions, cfg: TrainConfig, trained: dict[str, torch.Tensor], device: Any, dtype: torch.dtype
) -> tuple[Any, Any]:
    """The original weights in `dtype` with the plan applied and the trained tensors put in.

    LoRA adapters are merged and calibration vectors folded here, in float32 where `dtype` is float32 (a
    calibrated weight is W * s computed in float32, cast to `dtype`). Frozen weights come from
    the model file, not from the training copy, which may have been cast to a lower precision.
    """
    from ...core.loading import load

    model, tokenizer = load(args.model, dtype=dtype, device=device)
    if transformed_record(model.config) is None:
        from ...core.transform import apply_plan

        apply_plan(model, args.plan or DEFAULT_PLAN)
    layers = trainable_layer_indices(recorded_widths(model.config), cfg.neighbours, cfg.train_last)
    freeze_all_but(model, layers, head=cfg.train_last > 0)
    if cfg.lora:
        model = add_lora(model, layers, cfg.lora_rank, cfg.lora_alpha)
    if cfg.calibrate != "none":
        calibrate_model(model, cfg.calibrate, cfg.weights_train)
    load_trained(model, trained)
    if cfg.lora:
        model = model.merge_and_unload()
    fold(model)  # the calibration vectors into the weights: the same names and shapes as without them
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


def load_trained(model: Any, trained: dict[str, torch.Tensor]) -> None:
    params = trainable_state(model)
    if set(params) != set(trained):
        missing = sorted(set(trained) ^ set(params))[:4]
        # programming error: the model is rebuilt from the same options
        raise RuntimeError(f"trained tensors do not match the rebuilt model (e.g. {missing}); this is a bug.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trained[name].to(p.dtype))


def save_model(model: Any, tokenizer: Any, out: Path) -> None:
    """Save with safetensors next to the tokenizer: a folder every truedepth command loads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _already_transformed(args: FinetuneOptions, cfg: TrainConfig, recorded: dict[str, Any]) -> Any:
    from ...core.plan import as_plan

    plan = as_plan(recorded["plan"])
    if args.plan is not None and not as_plan(args.plan).is_identity and as_plan(args.plan) != plan:
        raise PlanError(
            f"{args.model} was already transformed with plan '{plan}'; plans refer to the original "
            "layers, so pass the original model with --plan, or omit --plan to keep training this one."
        )
    check_plan_has_parallel_groups(plan, recorded)
    if args.loss is None and cfg.loss == "distill":  # the default loss needs a teacher this model lacks
        print(f"note: {args.model} is already transformed (no teacher): training with --loss lm.", file=sys.stderr)
        cfg.loss = "lm"
    if cfg.loss in TEACHER_LOSSES or cfg.block_weight:
        raise UserError(
            f"{args.model} is already transformed, so the model before the plan (the distillation "
            f"teacher of --loss {cfg.loss}) is not available; use --loss lm, or start from the original model with "
            "--plan."
        )
    return plan


def load_texts(args: FinetuneOptions) -> dict[str, str]:
    texts = {"train": training_text_for(args.data)}
    if not args.no_eval:
        texts |= measuring_texts(args)
        if texts["held_out"][:10000] in texts["train"]:
            print(
                f"warning: the training data contains the evaluation text ({args.eval_text}); held-out perplexity "
                "will overstate the recovery.",
                file=sys.stderr,
            )
    return texts


def _measurer(
    tokenizer: Any, texts: dict[str, str], args: FinetuneOptions, device: Any, dtype: torch.dtype, progress: bool
) -> Callable[[Any], dict[str, float]] | None:
    texts = {k: v for k, v in texts.items() if k in ("held_out", "other_domain")}
    if not texts or args.no_eval:
        return None
    return lambda model: perplexities(
        model, tokenizer, texts, args.eval_tokens, args.eval_window, device, dtype, progress
    )


def _report_setup(
    args: FinetuneOptions,
    cfg: TrainConfig,
    setup: Setup,
    model: Any,
    data: TokenBatches,
    memory: dict[str, int],
    train_dtype: torch.dtype,
) -> None:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in unique_parameters(model))
    epochs = data.epochs(cfg.total_steps)
    depth = len(recorded_widths(setup.student.config))
    count = f"{n_train / 1e6:.2f}M" if n_train >= 1e5 else f"{n_train:,}"  # calibration vectors: a few thousand
    print(
        f"plan {setup.plan}: training layers {setup.trained_layers} of {depth} "
        f"({_what_trains(cfg)}; {count} of {n_all / 1e6:.1f}M parameters), loss {cfg.loss}, "
        f"computing in {str(train_dtype)[6:]}",
        file=sys.stderr,
    )
    print(
        f"data {args.data}: {data.num_sequences} sequences of {cfg.seq_len} tokens; {cfg.total_steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} = {cfg.total_steps * cfg.tokens_per_step} tokens ({epochs:.2f} epochs); "
        f"estimated extra memory {memory['total'] / 2**30:.2f} GiB",
        file=sys.stderr,
    )
    if epochs > 1:
        print(
            f"note: {epochs:.1f} passes over the training data; beyond one the model may memorise it.", file=sys.stderr
        )


def _what_trains(cfg: TrainConfig) -> str:
    weights = f"LoRA r={cfg.lora_rank}" if cfg.lora else "full weights"
    if cfg.calibrate == "none":
        return weights
    if not cfg.weights_train:
        return f"calibration vectors ({cfg.calibrate}) only"
    return f"calibration vectors ({cfg.calibrate}) for {cfg.calibrate_steps} steps, then {weights}"
