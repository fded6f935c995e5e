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

from ..apps.compress.core import CompressOptions
from ..apps.compress.run import run_compress
from ..apps.finetune.config import LOSSES
from .common import add_model_arguments, options

D = CompressOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, plan=False)
    parser.add_argument("--target-depth", type=int, required=True, metavar="D",
                        help="layers the compressed model runs one after another (1 <= D < the model's depth)")
    parser.add_argument("--budget-minutes", type=float, default=D.budget_minutes,
                        help="wall time for the whole command, split across the stages. Default: %(default)s")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the compressed model and its report")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds and start over")
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks to compare as well, "
                                                      "e.g. truedepth_austen_lastword,truedepth_mmlu")
    parser.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    texts = parser.add_argument_group("texts")
    texts.add_argument("--data", default=D.data, help="training text for calibration and fine-tuning (a text spec of `eval --text`). "
                       "Default: %(default)s: the five training novels and varied short texts, interleaved "
                       "(other domain 1.126x base at depth 24 against 1.179x on the novels alone, docs/COMPRESS.md)")
    texts.add_argument("--eval-text", default=D.eval_text, help="held-out text. Default: %(default)s (the held-out novel)")
    texts.add_argument("--other-text", default=D.other_text, help="text of another domain, 'none' to skip. "
                                                                  "Default: %(default)s (the Jargon File)")
    texts.add_argument("--eval-tokens", type=int, default=D.eval_tokens, help="tokens scored per text. Default: %(default)s")
    texts.add_argument("--eval-window", type=int, default=D.eval_window, help="perplexity window. Default: %(default)s")
    search = parser.add_argument_group("search (see `truedepth search --help`)")
    search.add_argument("--calib-windows", type=int, default=D.calib_windows, help="Default: %(default)s")
    search.add_argument("--calib-length", type=int, default=D.calib_length, help="Default: %(default)s")
    search.add_argument("--select-windows", type=int, default=D.select_windows, help="Default: %(default)s")
    search.add_argument("--search-dtype", default=D.search_dtype, help="dtype the search scores plans in: bf16, fp32 or "
                        "'auto' (bf16 where timing finds it 1.2x faster than fp32 on this device, as the "
                        "fine-tune's --train-dtype auto). Default: %(default)s")
    ft = parser.add_argument_group("fine-tuning (see `truedepth finetune --help`)")
    ft.add_argument("--generate-tokens", type=int, default=D.generate_tokens,
                    help="tokens of text the base model generates itself (from BOS, temperature 1) to distil on as "
                         "well: data-free distillation. 0: none (on the default model it did worse than the "
                         "training novels alone, docs/COMPRESS.md). Default: %(default)s")
    ft.add_argument("--corpus-share", type=float, default=D.corpus_share,
                    help="share of --data in the fine-tuning text, the rest generated. Default: 1 without "
                         "--generate-tokens, 0.5 with it")
    ft.add_argument("--loss", choices=LOSSES, default=D.loss,
                    help="distill, blocks (each wide layer matched to the layers it replaced; about 2x the tokens "
                         "per minute) or lm. Default: %(default)s")
    ft.add_argument("--tokens", type=int, default=D.tokens,
                    help="training tokens of the schedule; training stops earlier when its time is up. "
                         "Default: as many as fit in the fine-tune's time (timed on the first batch)")
    ft.add_argument("--seq-len", type=int, default=D.seq_len, help="Default: %(default)s")
    ft.add_argument("--batch-size", type=int, default=D.batch_size, help="Default: %(default)s")
    ft.add_argument("--lr", type=float, default=D.lr, help="Default: %(default)s")
    ft.add_argument("--neighbours", type=int, default=D.neighbours,
                    help="also train this many ordinary layers on each side of every wide block; as many as "
                         "the depth trains every layer (on the default model no better at equal time, "
                         "docs/COMPRESS.md). Default: %(default)s (wide layers only)")
    ft.add_argument("--train-dtype", default=D.train_dtype, help="Default: %(default)s (bf16 where the CPU or GPU is fast at it)")
    ft.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every, help="Default: %(default)s")
    parser.add_argument("--decode-tokens", type=int, default=D.decode_tokens,
                        help="new tokens per decode-speed run. Default: %(default)s")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    run_compress(options(CompressOptions, args, command_line=" ".join(["truedepth", *sys.argv[1:]])))
    return 0
