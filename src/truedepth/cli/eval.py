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

--against base (or a plan of --model, or another model with the same tokenizer) compares the model with that
reference on the same windows: top-1 agreement (share of scored tokens where both models' most likely next
token is the same), mean KL(reference || model) in nats per token, and both perplexities; --mmlu-chat N asks
N MMLU questions through the chat template and reports how often both pick the same letter.

Examples:
  truedepth eval --plan parallel=20:28 --text default --tokens 16384 --window 1024
  truedepth eval --model default --plan parallel=20:28 --text notes.txt --json
  truedepth eval --tasks truedepth_austen_lastword --limit 100   # ICL only (no --text: no perplexity)
  truedepth eval --plan parallel=20:28 --against base --text other-domain --mmlu-chat 100
"""

from __future__ import annotations

import argparse
import json
import sys

from ..measure.eval.evaluate import EvalOptions, evaluate, format_table
from ..utils.options import add_options, from_args
from .common import Printing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EvalOptions)
    add_options(parser, Printing)


def run(args: argparse.Namespace) -> int:
    result = evaluate(from_args(EvalOptions, args))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(format_table(result))
    sys.stdout.flush()
    return 0


def resume_note(args: argparse.Namespace) -> str:
    return "Nothing was saved; run it again (fewer --tokens or a --limit make it shorter)."
