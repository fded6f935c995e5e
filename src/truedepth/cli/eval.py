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

from ..measure.eval.evaluate import EvalOptions, evaluate, format_table
from .common import add_model_arguments, add_tp_arguments, options, tp_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, plan=True)
    parser.add_argument("--text", default=None,
                        help="text to score: 'default' (held-out Austen novel), 'austen:<novel>', 'austen-train', "
                             "'other-domain', a UTF-8 file, or a datasets name. Default: 'default', or no "
                             "perplexity at all when only --tasks is given")
    parser.add_argument("--tokens", type=int, default=EvalOptions.tokens,
                        help="score the first N tokens of the text (fewer if the text is shorter). Default: %(default)s")
    parser.add_argument("--window", type=int, default=EvalOptions.window, help="tokens per window. Default: %(default)s")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding windows: start a window every S tokens and score its last S tokens "
                             "(1 <= S <= window). Default: the window (disjoint windows)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per forward pass (default: about 2048 tokens per batch)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated lm-evaluation-harness tasks to run as well, e.g. "
                             "truedepth_austen_lastword,truedepth_mmlu (offline); see truedepth.measure.eval.icl")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task question")
    parser.add_argument("--limit", type=int, default=None, help="at most N examples per task (quick checks)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_tp_arguments(parser)


def run(args: argparse.Namespace) -> int:
    result = evaluate(options(EvalOptions, args, tp=tp_options(args)))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(format_table(result))
    sys.stdout.flush()
    return 0


def resume_note(args: argparse.Namespace) -> str:
    return "Nothing was saved; run it again (fewer --tokens or a --limit make it shorter)."
