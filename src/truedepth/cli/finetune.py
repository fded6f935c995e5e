"""Fine-tune only the parallelized (wide) layers of an LP model to win quality back.

Only the parameters of the wide layers -- the fused parallel groups -- are trained; every other
weight stays frozen (`--neighbours N` also trains the N ordinary layers on each side of every wide
block). Three losses:

  lm       next-token cross-entropy on the training text
  distill  KL(teacher || student) on the next-token distributions, where the teacher is the same
           model before the plan. The teacher shares every frozen weight with the student, so it
           costs only one extra copy of the original layers that the plan fused.
  blocks   each wide layer's update matched to the update of the original layers it replaced, run
           on the same input hidden state (squared error relative to the update's size). Each wide
           layer learns only its own error and the forward stops after the last one: no logits,
           about 2x the tokens per second of distill. `--block-weight W` adds it to distill instead.

`--lora` trains low-rank adapters (peft) on the wide layers' linear modules instead of their full
weights, and merges them before saving: the saved wide layers keep their shapes.

Default data: the five Austen novels other than the held-out one that `eval --text default` scores,
so training and evaluation text never overlap. The output folder is an ordinary saved truedepth
model (`truedepth.load(DIR)`, every other command), plus finetune_summary.json (perplexity of the
base, LP and fine-tuned models on the held-out novel and on other-domain text, recovered fraction
(ppl_LP - ppl_FT) / (ppl_LP - ppl_base), loss curve) and finetune_curve.png.

Checkpoints (trainable weights, optimizer, scheduler, RNG state, data position; safetensors + JSON)
are written atomically every --checkpoint-every steps under DIR/checkpoints; `--resume` continues
from the latest one and ends with the same weights as an uninterrupted run.

Precision: trained weights are always float32 (the master copy AdamW updates). Training steps run
under torch.autocast in --train-dtype with the frozen weights stored in it (auto: bf16 on GPU and on
CPUs where a quick matrix-multiply timing finds bf16 faster than fp32; else fp32). The saved
model and every perplexity use --dtype (default fp32 on CPU, bf16 on GPU): the final model is
rebuilt from the original weights with the trained tensors put in, so frozen weights never pass
through bf16.

Examples:
  truedepth finetune --plan parallel=20:28 --tokens 200000 --out runs/ft
  truedepth finetune --plan parallel=20:28 --loss distill --max-minutes 15 --out runs/ft-kd
  truedepth finetune --plan parallel=20:28 --out runs/ft --resume        # after an interruption
"""

from __future__ import annotations

import argparse

from ..apps.finetune.config import DEFAULT_PLAN, EVAL_DEFAULTS, LOSSES, FinetuneOptions, TrainConfig
from ..apps.finetune.run import run_finetune
from .common import add_model_arguments, options


# =============================================================================================
# The command
# =============================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, plan=False)
    parser.add_argument("--plan", default=None,
                        help=f"plan to apply before fine-tuning (must contain a parallel group). Default: {DEFAULT_PLAN}, "
                             "or the recorded plan of an already transformed --model")
    d = TrainConfig()
    g = parser.add_argument_group("training")
    g.add_argument("--data", default="default",
                   help="training text: 'default' = the five Austen novels other than the held-out one, or any text "
                        "spec of `eval --text` (austen:<name>, a .txt path, a datasets name). Default: %(default)s")
    g.add_argument("--tokens", type=int, default=None, help=f"training tokens in total (default {d.tokens})")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per training sequence (default {d.seq_len})")
    g.add_argument("--batch-size", type=int, default=None, help=f"sequences per step (default {d.batch_size})")
    g.add_argument("--loss", choices=LOSSES, default=None,
                   help="distill: KL to the model before the plan; blocks: each wide layer's update matched to the "
                        "update of the layers it replaced, on the same input (no logits: faster); lm: next-token "
                        "cross-entropy (adapts to the training text). Default: distill (lm for an already "
                        "transformed --model, which has no teacher)")
    g.add_argument("--block-weight", type=float, default=None,
                   help="with --loss distill: add the blocks loss times this weight (default 0: off)")
    g.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default {d.lr})")
    g.add_argument("--warmup", type=float, default=None, help=f"warm-up fraction of the steps (default {d.warmup})")
    g.add_argument("--min-lr-ratio", type=float, default=None,
                   help=f"cosine decay ends at lr x this (default {d.min_lr_ratio})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, default=None, help=f"gradient-norm clip, 0 = off (default {d.grad_clip})")
    g.add_argument("--seed", type=int, default=None, help=f"data order seed (default {d.seed})")
    g.add_argument("--lora", action="store_true", default=None,
                   help="train peft LoRA adapters on the wide layers' linear modules instead of full weights; "
                        "merged before saving")
    g.add_argument("--lora-rank", type=int, default=None, help=f"LoRA rank (default {d.lora_rank})")
    g.add_argument("--lora-alpha", type=float, default=None, help=f"LoRA alpha (default {d.lora_alpha})")
    g.add_argument("--neighbours", type=int, default=None,
                   help="also train this many ordinary layers on each side of every wide block (default 0: wide "
                        "layers only)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes of training steps (evaluation excluded); the run "
                        "is saved and summarised as usual")
    g.add_argument("--fit-tokens", action="store_true",
                   help="set --tokens from one timed training step so that the whole schedule (warm-up, cosine "
                        "decay) ends inside --max-minutes, instead of being cut off at a high learning rate")
    g.add_argument("--train-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="precision of the training forward/backward (torch.autocast; frozen weights stored in it, "
                        "trained weights kept in fp32). auto: bf16 on GPU and on CPUs where a quick "
                        "matrix-multiply timing finds bf16 faster (not every CPU with AVX512-BF16 is), else fp32. "
                        "The saved model and all perplexities use --dtype. "
                        "Default: %(default)s")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    o = parser.add_argument_group("output and resuming")
    o.add_argument("--out", required=True, help="output folder: the fine-tuned model, summary, plot, checkpoints")
    o.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    o.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write a checkpoint every K steps. Default: %(default)s")
    o.add_argument("--keep-checkpoints", action="store_true", dest="keep_checkpoints_after",
                   help="keep the last checkpoints after a finished run (default: removed once the model is saved; "
                        "a run stopped by --max-minutes always keeps them, so it can be resumed)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out, or write into a non-empty folder that is not a run")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--eval-text", help=f"held-out text spec (default {EVAL_DEFAULTS['eval_text']!r}: the held-out novel)")
    e.add_argument("--other-text", help="a text of another kind, to see whether recovery carries over; 'none' to skip "
                                        f"(default {EVAL_DEFAULTS['other_text']!r}: the Jargon File)")
    e.add_argument("--eval-tokens", type=int, help=f"tokens scored per text (default {EVAL_DEFAULTS['eval_tokens']})")
    e.add_argument("--eval-window", type=int, help=f"perplexity window (default {EVAL_DEFAULTS['eval_window']})")
    e.add_argument("--eval-every", type=int,
                   help="also score the held-out text every K steps and at step 0, for recovery vs tokens; these "
                        "points are scored with the training copy (frozen weights in --train-dtype). Default: off")
    e.add_argument("--no-eval", action="store_true", default=None, help="skip every perplexity evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    return run_finetune(options(FinetuneOptions, args))


def resume_note(args: argparse.Namespace) -> str:
    from pathlib import Path

    from ..apps.finetune.checkpoint import latest_checkpoint

    last = latest_checkpoint(Path(args.out)) if Path(args.out).is_dir() else None
    if last is None:
        return (f"No checkpoint had been written yet (one every --checkpoint-every {args.checkpoint_every} "
                "steps); run the same command again to start over.")
    return f"The latest checkpoint is {last}; add --resume to the same command to continue from it."
