"""From a model and a target depth to a shallower, fine-tuned, evaluated model folder, in one command.

Stages, each recorded in DIR/stages/ and skipped by a rerun with the same options:
  1. search    the plan at --target-depth, with `truedepth search`'s defaults, calibrated on --data
               (training text only)
  2. generate  with --generate-tokens N: text the base model samples itself (data-free
               distillation: any domain it knows, nothing downloaded); stops at its share of the
               budget. Off by default (measured: the novels alone did better, docs/COMPRESS.md)
  3. finetune  the plan's wide layers (`truedepth finetune`, loss distill by default) on --data
               (mixed with the generated text, --corpus-share); its schedule is fitted to the time
               left; an interrupted fine-tune resumes from its checkpoint
  4. evaluate  held-out and other-domain perplexity of the base model, the paper's contiguous plan at
               the same depth (no fine-tuning), the searched plan and the fine-tuned model; lm-eval
               --tasks; decode speed
  5. save      the model and tokenizer at the top of DIR, compress.json, README.md (model card), plots

--budget-minutes is split: search 20%, generation 10%, fine-tuning 50%, evaluation 20%; time an
earlier stage leaves unused (all of generation's when it is off) goes to the next ones. The search
cannot stop half-way: a budget whose fine-tuning time is gone before the search's least cost is
refused at once, naming the least budget that passes. A rerun whose options differ from those of a
finished stage is refused, naming the option and the stage (--overwrite starts over).

Examples:
  truedepth compress --target-depth 24 --budget-minutes 60 --out runs/d24
  truedepth compress --model my-model --target-depth 20 --budget-minutes 90 --tasks truedepth_mmlu --out runs/d20
"""

from __future__ import annotations

import argparse
import sys

from ..apps.compress import CompressOptions, run_compress
from ..apps.compress.options import HIDDEN_OPTIONS
from ..utils.options import add_options, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CompressOptions, exclude=HIDDEN_OPTIONS)


def run(args: argparse.Namespace) -> int:
    run_compress(from_args(CompressOptions, args, command=" ".join(["truedepth", *sys.argv[1:]])))
    return 0
