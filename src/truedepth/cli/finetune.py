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

from ..apps.finetune import FinetuneOptions, run_finetune
from ..utils.options import add_options, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FinetuneOptions)


def run(args: argparse.Namespace) -> int:
    return run_finetune(from_args(FinetuneOptions, args))


def resume_note(args: argparse.Namespace) -> str:
    from pathlib import Path

    from ..apps.finetune import latest_checkpoint

    last = latest_checkpoint(Path(args.out)) if Path(args.out).is_dir() else None
    if last is None:
        return (
            f"No checkpoint had been written yet (one every --checkpoint-every {args.checkpoint_every} "
            "steps); run the same command again to start over."
        )
    return f"The latest checkpoint is {last}; add --resume to the same command to continue from it."
