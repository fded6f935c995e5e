"""Perplexity and lm-evaluation-harness tasks of a model and plan (the library behind `truedepth eval`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ...core.loading import ModelOptions, PlanOption
from ...runtime.distributed.tp import TPOptions
from ...utils.errors import UserError
from ...utils.options import option, override
from ...utils.shared_options import ProgressOption
from .fidelity import FidelityOptions


@dataclass
class PerplexityText:
    """The text a perplexity is measured on, how much of it, in windows of how many tokens (eval, sweep, demo)."""

    text: str | None = option(
        "default",
        "text to score: 'default' (held-out Austen novel), 'austen:<novel>', "
        "'austen-train', 'other-domain', a UTF-8 file, or a datasets name.",
    )
    tokens: int = option(16384, "score the first N tokens of the text (fewer if the text is shorter).")
    window: int = option(1024, "tokens per window.")


@dataclass
class PerplexityOptions(PerplexityText):
    stride: int | None = option(
        None,
        "sliding windows: start a window every S tokens and score its last S tokens "
        "(1 <= S <= window). Default: the window (disjoint windows)",
    )


@dataclass
class TaskOptions:
    """lm-evaluation-harness tasks to run as well (eval, sweep)."""

    tasks: str | None = option(
        None,
        "comma-separated lm-evaluation-harness tasks to run as well, e.g. "
        "truedepth_austen_lastword,truedepth_mmlu (offline); see truedepth.measure.eval.icl",
    )
    num_fewshot: int | None = option(None, "few-shot examples per task question")
    limit: int | None = option(None, "at most N examples per task (per MMLU subject; for quick checks)")


@dataclass  # bases in reverse order: --help lists the last base's options first
class EvalOptions(ProgressOption, FidelityOptions, TaskOptions, PerplexityOptions, PlanOption, ModelOptions):
    """What `evaluate` measures: perplexity of `text` (None: only `tasks`) and/or lm-eval `tasks`; with `against`,
    fidelity to that reference on the text, and MMLU-chat choice agreement with it (`mmlu_chat` questions)."""

    text: str | None = override(None, default_help="'default', or no perplexity at all when only --tasks is given")
    batch_size: int | None = option(
        None,
        "windows per forward pass (default: about 2048 tokens per batch; with --against: one window, or 512 "
        "tokens of short ones)",
    )
    tp: TPOptions = field(default_factory=TPOptions)


def check_task_options(tasks: Any, num_fewshot: int | None, limit: int | None) -> None:
    """The lm-eval options (--num-fewshot, --limit) make sense, and only with --tasks (eval and sweep)."""
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more (got {num_fewshot}).")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit}).")
    if (num_fewshot is not None or limit is not None) and not tasks:
        raise UserError("--num-fewshot and --limit apply to --tasks; add --tasks (e.g. truedepth_austen_lastword).")


def check_args(args: EvalOptions) -> None:
    """Reject bad settings before anything is loaded."""
    from .perplexity import check_window_args

    if measures_text(args):
        check_window_args(args.tokens, args.window, args.stride)
    if args.against is not None and args.tp.enabled:
        raise UserError("--against loads a second model, which --tp does not shard; drop one of them.")
    if args.mmlu_chat < 0:
        raise UserError(f"--mmlu-chat is a number of questions, 0 or more (got {args.mmlu_chat}).")
    if args.mmlu_chat and args.against is None:
        raise UserError("--mmlu-chat compares the model's answers with a reference's; add --against (e.g. base).")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size}).")
    if args.tasks is not None and not task_list(args.tasks):
        raise UserError("--tasks is empty; pass task names separated by commas, e.g. --tasks truedepth_mmlu.")
    check_task_options(args.tasks, args.num_fewshot, args.limit)


def check_before_loading(args: EvalOptions) -> None:
    """The model folder, the plan against its config.json and the task names: seconds, not a model load."""
    from ...core.loading import check_model_and_plan

    config = check_model_and_plan(args.model, args.plan)
    positions = getattr(config, "max_position_embeddings", None)
    if args.against is not None:
        from .fidelity import reference_source

        reference_source(args.against, args.model, args.plan)
    if positions and measures_text(args) and args.window > positions:
        raise UserError(
            f"--window {args.window} is longer than the model's {positions} positions "
            f"(max_position_embeddings); use --window {positions} or less."
        )
    if args.tasks:
        from .icl import check_tasks, task_manager

        check_tasks(task_list(args.tasks), task_manager(task_list(args.tasks)))


def measures_text(args: EvalOptions) -> bool:
    """A text is scored: --text given, or no --tasks (perplexity on the default text), or --against."""
    return args.text is not None or not args.tasks or args.against is not None


def task_list(tasks: str | None) -> list[str]:
    return [t.strip() for t in (tasks or "").split(",") if t.strip()]


def model_facts(model: Any) -> dict[str, Any]:
    """Depth, original depth and plan of a (possibly transformed) model."""
    from ...core.arch import current_plan, original_depth

    config = model.config
    plan = current_plan(config)
    return {
        "depth": config.num_hidden_layers,
        "original_depth": original_depth(config),
        "plan": str(plan) if plan is not None else "base",
    }


def run_tasks(model: Any, tokenizer: Any, args: EvalOptions) -> dict:
    try:
        from .icl import evaluate_tasks
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("truedepth"):
            raise UserError(
                "--tasks needs truedepth.measure.eval.icl, which this installation lacks; "
                "update truedepth or drop --tasks."
            ) from None
        raise UserError(
            f"--tasks needs the package {e.name!r}; install it with `pip install 'truedepth[eval]'` or drop --tasks."
        ) from None
    return evaluate_tasks(model, tokenizer, tasks=task_list(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit)


def text_token_ids(args: EvalOptions, text_spec: str) -> list[int]:
    """Load and tokenise the text, and check it fills a window, before the model is loaded."""
    from ...core.loading import load_tokenizer, resolve
    from .data import load_text
    from .perplexity import make_windows, tokenize

    text = load_text(text_spec)
    tokenizer = load_tokenizer(args.model, resolve(args.model))
    ids = tokenize(tokenizer, text, args.tokens)
    make_windows(ids, args.tokens, args.window, args.stride)  # raises if the text is too short
    return ids


def evaluate(args: EvalOptions) -> dict[str, Any]:
    """Load, transform and evaluate as the arguments say; return the result record."""
    from ...runtime.distributed.tp import (
        is_main,
        load_model,
    )  # the plain loader unless --tp: then each rank loads its shard
    from .perplexity import perplexity

    check_args(args)
    check_before_loading(args)
    start = time.perf_counter()
    text_spec = (args.text if args.text is not None else "default") if measures_text(args) else None
    ids = text_token_ids(args, text_spec) if text_spec is not None else None
    model, tokenizer = load_model(args.model, args.plan, args.dtype, args.device, args.tp)
    reference = load_reference(args) if args.against is not None else None
    param = next(model.parameters())
    result: dict[str, Any] = {
        "model": args.model,
        **model_facts(model),
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
    }
    progress = not args.no_progress and is_main()
    windows = dict(tokens=args.tokens, window=args.window, stride=args.stride, batch_size=args.batch_size)
    windows["progress"] = progress  # the same windows for perplexity alone and for fidelity
    if ids is not None and reference is not None:
        from .fidelity import fidelity

        # the model's perplexity comes with it, from the same forward passes
        fid = fidelity(reference, model, tokenizer, ids, **windows)
        result.update({"text": text_spec, **{k: v for k, v in fid.items() if k in PERPLEXITY_KEYS}})
        result["against"] = args.against
        result["fidelity"] = {k: v for k, v in fid.items() if k not in PERPLEXITY_KEYS}
    elif ids is not None:
        ppl = perplexity(model, tokenizer, ids, **windows)
        result.update({"text": text_spec, **ppl})
    if args.mmlu_chat:
        from .fidelity import mmlu_chat_agreement

        result["mmlu_chat"] = mmlu_chat_agreement(reference, model, tokenizer, args.mmlu_chat, progress=progress)
    if args.tasks:
        result["task_names"] = task_list(args.tasks)
        result["tasks"] = run_tasks(model, tokenizer, args)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# what `perplexity` returns: `fidelity` returns these too, for the model, from the same forward passes
PERPLEXITY_KEYS = ("perplexity", "nll", "tokens", "windows", "window", "stride", "used_tokens")


def load_reference(args: EvalOptions) -> Any:
    """The model --against names (reference_source), in --dtype on --device like the model itself."""
    from ...core.loading import load_for_device
    from .fidelity import reference_source

    source, plan = reference_source(args.against, args.model, args.plan)
    return load_for_device(source, plan=plan, dtype=args.dtype, device=args.device)[0]


def task_rows(results: dict[str, Any], tasks: list[str]) -> list[tuple[str, str]]:
    """One row per requested task with its main metric (all subtasks stay in --json output)."""
    rows = []
    for task in tasks:
        metrics = results.get(task) or {}
        numeric = [
            (k, v)
            for k, v in metrics.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and not k.endswith("_stderr")
            and k not in ("n_samples", "num_fewshot")
        ]
        main = next(
            (kv for key in ("acc", "acc_norm", "exact_match") for kv in numeric if kv[0] == key),
            numeric[0] if numeric else None,
        )
        if main is None:
            rows.append((task, "no result"))
            continue
        stderr = metrics.get(f"{main[0]}_stderr")
        value = f"{main[0]} {main[1]:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")
        if metrics.get("n_samples") is not None:
            value += f" (n={metrics['n_samples']})"
        rows.append((task, value))
    return rows


def format_table(result: dict[str, Any]) -> str:
    """A small aligned two-column table of the result."""
    rows = [
        ("model", result["model"]),
        ("plan", result["plan"]),
        ("depth", f"{result['depth']} (original {result['original_depth']})"),
        ("dtype / device", f"{result['dtype']} / {result['device']}"),
    ]
    if "perplexity" in result:
        kind = "disjoint" if result["stride"] == result["window"] else f"sliding, stride {result['stride']}"
        rows += [
            ("text", result["text"]),
            ("windows", f"{result['windows']} x {result['window']} tokens ({kind})"),
            ("tokens scored", str(result["tokens"])),
            ("nll / token", f"{result['nll']:.4f}"),
            ("perplexity", f"{result['perplexity']:.3f}"),
        ]
    if "fidelity" in result:
        fid = result["fidelity"]
        rows += [
            ("against", str(result["against"])),
            ("reference perplexity", f"{fid['reference_perplexity']:.3f}"),
            ("top-1 agreement", f"{fid['top1_agreement']:.2%} of {result['tokens']} tokens"),
            ("KL(reference || model)", f"{fid['kl']:.4f} nats / token"),
        ]
    if "mmlu_chat" in result:
        chat = result["mmlu_chat"]
        rows += [
            (
                f"MMLU-chat ({chat['questions']} q.)",
                f"same choice as the reference {chat['agreement']:.1%} (chance {chat['chance_agreement']:.1%})",
            ),
            ("  accuracy", f"model {chat['accuracy']:.1%}, reference {chat['reference_accuracy']:.1%}"),
            ("  unparsed answers", f"model {chat['unparsed']}, reference {chat['reference_unparsed']}"),
        ]
    if "tasks" in result:
        rows += task_rows(result["tasks"], result.get("task_names", list(result["tasks"])))
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
