"""Perplexity of a model (optionally transformed by a plan) on a text, and optionally
lm-evaluation-harness tasks (--tasks).

Perplexity is computed over the first --tokens tokens of --text, in windows of --window tokens:
  disjoint windows (default, stride = window): every token of a window but the first is scored,
    given the earlier tokens of the same window;
  --stride S < window: the sliding-window convention of the Hugging Face perplexity guide: windows
    start every S tokens and each scores only its last S tokens (the first window: all but its
    first), with the rest of the window as context. Lower perplexity, about window/S times slower.
Only whole windows are evaluated.

--text accepts 'default' (the held-out Austen novel 'persuasion'), 'austen:<novel>',
'austen-train', 'other-domain' (the Jargon File), any UTF-8 text file, or a Hugging Face dataset
'name[:config][@split]' (needs `datasets` and network access).

Examples:
  truedepth eval --plan parallel=20:28 --text default --tokens 16384 --window 1024
  truedepth eval --model default --plan parallel=20:28 --text notes.txt --json
  truedepth eval --tasks truedepth_austen_lastword --limit 100   # ICL only (no --text: no perplexity)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .cli import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, plan=True)
    parser.add_argument("--text", default=None,
                        help="text to score: 'default' (held-out Austen novel), 'austen:<novel>', 'austen-train', "
                             "'other-domain', a UTF-8 file, or a datasets name. Default: 'default', or no "
                             "perplexity at all when only --tasks is given")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="score the first N tokens of the text (fewer if the text is shorter). Default: %(default)s")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window. Default: %(default)s")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding windows: start a window every S tokens and score its last S tokens "
                             "(1 <= S <= window). Default: the window (disjoint windows)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per forward pass (default: about 2048 tokens per batch)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated lm-evaluation-harness tasks to run as well, e.g. "
                             "truedepth_austen_lastword,truedepth_mmlu (offline); see truedepth.icl")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task question")
    parser.add_argument("--limit", type=int, default=None, help="at most N examples per task (quick checks)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    from .tp import add_tp_arguments

    add_tp_arguments(parser)


def check_args(args: argparse.Namespace) -> None:
    """Reject bad settings before anything is loaded."""
    from .perplexity import check_window_args

    if args.text is not None or not args.tasks:
        check_window_args(args.tokens, args.window, args.stride)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {args.batch_size}).")
    if args.tasks is not None and not task_list(args.tasks):
        raise ValueError("--tasks is empty; pass task names separated by commas, e.g. --tasks truedepth_mmlu.")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be 0 or more (got {args.num_fewshot}).")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {args.limit}).")


def task_list(tasks: str | None) -> list[str]:
    return [t.strip() for t in (tasks or "").split(",") if t.strip()]


def model_facts(model: Any) -> dict[str, Any]:
    """Depth, original depth and plan of a (possibly transformed) model."""
    from .transform import current_plan

    config = model.config
    info = getattr(config, "truedepth", None) or {}
    plan = current_plan(config)
    return {"depth": config.num_hidden_layers,
            "original_depth": info.get("original_num_hidden_layers", config.num_hidden_layers),
            "plan": str(plan) if plan is not None else "base"}


def run_tasks(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    try:
        from .icl import evaluate_tasks
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("truedepth"):
            raise RuntimeError("--tasks needs truedepth.icl, which this installation lacks; "
                               "update truedepth or drop --tasks.") from None
        raise RuntimeError(f"--tasks needs the package {e.name!r}; install it with "
                           "`pip install 'truedepth[eval]'` or drop --tasks.") from None
    return evaluate_tasks(model, tokenizer, tasks=task_list(args.tasks), num_fewshot=args.num_fewshot,
                          limit=args.limit)


def text_token_ids(args: argparse.Namespace, text_spec: str) -> list[int]:
    """Load and tokenise the text, and check it fills a window, before the model is loaded."""
    from transformers import AutoTokenizer

    from .data import load_text
    from .models import resolve
    from .perplexity import make_windows, tokenize

    text = load_text(text_spec)
    tokenizer = AutoTokenizer.from_pretrained(resolve(args.model), trust_remote_code=False)
    ids = tokenize(tokenizer, text, args.tokens)
    make_windows(ids, args.tokens, args.window, args.stride)  # raises if the text is too short
    return ids


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Load, transform and evaluate as the arguments say; return the result record."""
    from .perplexity import perplexity
    from .tp import is_main, load_from_args  # the plain loader unless --tp: then each rank loads its shard

    check_args(args)
    start = time.perf_counter()
    text_spec = args.text if args.text is not None or args.tasks else "default"
    ids = text_token_ids(args, text_spec) if text_spec is not None else None
    model, tokenizer = load_from_args(args)
    param = next(model.parameters())
    result: dict[str, Any] = {"model": args.model, **model_facts(model), "dtype": str(param.dtype).replace("torch.", ""),
                              "device": str(param.device)}
    if ids is not None:
        ppl = perplexity(model, tokenizer, ids, tokens=args.tokens, window=args.window, stride=args.stride,
                         batch_size=args.batch_size, progress=not args.no_progress and is_main())
        result.update({"text": text_spec, **ppl})
    if args.tasks:
        result["task_names"] = task_list(args.tasks)
        result["tasks"] = run_tasks(model, tokenizer, args)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def task_rows(results: dict[str, Any], tasks: list[str]) -> list[tuple[str, str]]:
    """One row per requested task with its main metric (all subtasks stay in --json output)."""
    rows = []
    for task in tasks:
        metrics = results.get(task) or {}
        numeric = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not k.endswith("_stderr") and k not in ("n_samples", "num_fewshot")]
        main = next((kv for key in ("acc", "acc_norm", "exact_match") for kv in numeric if kv[0] == key),
                    numeric[0] if numeric else None)
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
    rows = [("model", result["model"]), ("plan", result["plan"]),
            ("depth", f"{result['depth']} (original {result['original_depth']})"),
            ("dtype / device", f"{result['dtype']} / {result['device']}")]
    if "perplexity" in result:
        kind = "disjoint" if result["stride"] == result["window"] else f"sliding, stride {result['stride']}"
        rows += [("text", result["text"]),
                 ("windows", f"{result['windows']} x {result['window']} tokens ({kind})"),
                 ("tokens scored", str(result["tokens"])),
                 ("nll / token", f"{result['nll']:.4f}"),
                 ("perplexity", f"{result['perplexity']:.3f}")]
    if "tasks" in result:
        rows += task_rows(result["tasks"], result.get("task_names", list(result["tasks"])))
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(format_table(result))
    sys.stdout.flush()
    return 0
