"""What a fine-tune is: its training options (TrainConfig), their defaults, and the names of its files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


LOSSES = ("lm", "distill", "blocks")


TEACHER_LOSSES = ("distill", "blocks")  # need the model before the plan


# Options that define what is measured; a resumed run takes them from the checkpoint.
RUN_OPTIONS = ("model", "plan", "data", "dtype", "eval_text", "other_text", "eval_tokens", "eval_window", "eval_every",
               "no_eval")


EVAL_DEFAULTS = {"eval_text": "default", "other_text": "other-domain", "eval_tokens": 16384, "eval_window": 512,
                 "eval_every": 0}


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


CHECKPOINT_DIR = "checkpoints"


SUMMARY_FILE = "finetune_summary.json"


CURVE_FILE = "finetune_curve.png"


CHECKPOINT_FORMAT = 1


DEFAULT_PLAN = "parallel=20:28"


# Options that define the training trajectory: a resumed run must use the same values.
TRAJECTORY_OPTIONS = ("loss", "seq_len", "batch_size", "tokens", "lr", "min_lr_ratio", "warmup", "weight_decay",
                      "grad_clip", "seed", "lora", "lora_rank", "lora_alpha", "neighbours", "train_dtype", "block_weight")


# =============================================================================================
# Options
# =============================================================================================
@dataclass
class TrainConfig:
    """Everything that determines the training trajectory (saved in every checkpoint)."""
    loss: str = "distill"  # recovers what LP lost on any text; lm adapts to the training domain (docs/FINETUNE.md)
    seq_len: int = 256
    batch_size: int = 4
    tokens: int = 200_000  # training tokens (input tokens per step = batch_size * seq_len)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    neighbours: int = 0
    block_weight: float = 0.0  # weight of the block-matching loss added to --loss distill
    train_dtype: str = "fp32"  # autocast dtype of the training steps (resolved from --train-dtype)
    # not part of the trajectory: when to checkpoint / evaluate / stop
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0
    max_minutes: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown --loss {self.loss!r}; use one of {', '.join(LOSSES)}.")
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size, "tokens": self.tokens,
                    "checkpoint_every": self.checkpoint_every, "keep_checkpoints": self.keep_checkpoints,
                    "lora_rank": self.lora_rank}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer (got {value!r}).")
        if self.seq_len < 2:
            raise ValueError("--seq-len must be at least 2 tokens (one input and one target).")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive (got {self.lr}).")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"--warmup is a fraction of the steps in [0, 1) (got {self.warmup}).")
        if self.neighbours < 0 or self.eval_every < 0:
            raise ValueError("--neighbours and --eval-every must be >= 0.")
        if not self.block_weight >= 0:
            raise ValueError(f"--block-weight must be >= 0 (got {self.block_weight}).")
        if self.loss == "blocks" and self.neighbours:
            raise ValueError("--loss blocks trains each wide layer on its own error, which never reaches the "
                             "--neighbours layers; use --loss distill --block-weight W to train them as well.")
        if self.block_weight and self.loss != "distill":
            raise ValueError(f"--block-weight adds the blocks loss to --loss distill, not to --loss {self.loss}; "
                             "drop --block-weight (--loss blocks is the blocks loss alone).")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be positive (got {self.max_minutes}).")

    def trajectory(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRAJECTORY_OPTIONS}


@dataclass
class FinetuneOptions:
    """Everything `truedepth finetune` takes (see its --help). None = not given: TrainConfig's default,
    or on --resume the checkpoint's value."""
    model: str = "default"
    dtype: str | None = None
    device: str | None = None
    plan: str | None = None
    data: str = "default"
    tokens: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    loss: str | None = None
    lr: float | None = None
    warmup: float | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    seed: int | None = None
    lora: bool | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    neighbours: int | None = None
    block_weight: float | None = None
    max_minutes: float | None = None
    fit_tokens: bool = False  # set --tokens from a timed step so the cosine schedule ends at --max-minutes
    train_dtype: str = "auto"
    threads: int | None = None
    out: str | None = None
    resume: bool = False
    checkpoint_every: int = 50
    keep_checkpoints_after: bool = False
    overwrite: bool = False
    eval_text: str | None = None
    other_text: str | None = None
    eval_tokens: int | None = None
    eval_window: int | None = None
    eval_every: int | None = None
    no_eval: bool | None = None
    quiet: bool = False
