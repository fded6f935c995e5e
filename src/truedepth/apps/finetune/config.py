"""What a fine-tune is: its training options (TrainOptions, each declared once with its default and help),
the trajectory record of a run (TrainConfig), `truedepth finetune`'s options, and the names of its files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...core.loading import ModelOptions, PlanOption
from ...measure.eval.heldout import EvalTextOptions
from ...utils.errors import UserError
from ...utils.options import option, option_names, override
from ...utils.shared_options import OutDirOption, OverwriteOption, QuietOption, SeedOption, ThreadsOption

LOSSES = ("lm", "distill", "blocks")


CALIBRATE = ("none", "scales", "norms", "both")  # what `--calibrate` trains (apps/finetune/calibrate.py)
CALIBRATE_LR = 3e-2  # of 1e-2, 3e-2 and 1e-1 the best on the default model (docs/research/finetune-experiments.md)


TEACHER_LOSSES = ("distill", "blocks")  # need the model before the plan


# Options that define what is measured; a resumed run takes them from the checkpoint.
RUN_OPTIONS = (
    "model",
    "plan",
    "data",
    "dtype",
    "eval_text",
    "other_text",
    "eval_tokens",
    "eval_window",
    "eval_every",
    "no_eval",
)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


CHECKPOINT_DIR = "checkpoints"


SUMMARY_FILE = "finetune_summary.json"


CURVE_FILE = "finetune_curve.png"


CHECKPOINT_FORMAT = 1


DEFAULT_PLAN = "parallel=20:28"


DEFAULT_LOSS = "distill"  # recovers what LP lost on any text; lm adapts to the training domain (docs/FINETUNE.md)


# =============================================================================================
# Options
# =============================================================================================
@dataclass
class TrainOptions(SeedOption):
    """How the wide layers train: every option that sets the training trajectory, and the checkpoints."""

    group_title = "training"
    tokens: int = option(200_000, "training tokens in total (input tokens per step = batch size x sequence length).")
    seq_len: int = option(256, "tokens per training sequence.")
    batch_size: int = option(4, "sequences per step.")
    loss: str | None = option(
        None,
        "distill: KL to the model before the plan; blocks: each wide layer's update "
        "matched to the update of the layers it replaced, on the same input (no logits: "
        "faster); lm: next-token cross-entropy (adapts to the training text). "
        f"Default: {DEFAULT_LOSS} (lm for an already transformed --model, which has no teacher)",
        choices=LOSSES,
    )
    block_weight: float = option(
        0.0, "with --loss distill: add the blocks loss times this weight (0: off)", show_default=False
    )
    lr: float = option(3e-4, "peak AdamW learning rate.")
    warmup: float = option(0.05, "warm-up fraction of the steps.")
    min_lr_ratio: float = option(0.1, "cosine decay ends at lr x this.")
    weight_decay: float = option(0.0, "AdamW weight decay. Default: 0.0")
    grad_clip: float = option(1.0, "gradient-norm clip, 0 = off.")
    seed: int = override(0, help_note="(the order of the training data).")
    lora: bool = option(
        False,
        "train peft LoRA adapters on the wide layers' linear modules instead of full weights; merged before saving",
    )
    lora_rank: int = option(16, "LoRA rank.")
    lora_alpha: float = option(32.0, "LoRA alpha.")
    calibrate: str = option(
        "none",
        "few-parameter calibration of every wide layer, folded into its weights when saving: per member "
        "layer, scales: one gain per output channel of its attention and of its MLP output; norms: its "
        "input-norm and post-attention-norm gains (folded into its projections by the transform, trained "
        "as separate vectors); both. Trained for the first --calibrate-share of the steps, then the wide "
        "layers' weights train",
        choices=CALIBRATE,
    )
    calibrate_share: float = option(
        1.0, "with --calibrate: share of the steps that calibrate before the weights train; 1: calibration only"
    )
    calibrate_lr: float = option(CALIBRATE_LR, "with --calibrate: peak AdamW learning rate of the calibration vectors.")
    neighbours: int = option(
        0, "also train this many ordinary layers on each side of every wide block. Default: 0 (wide layers only)"
    )
    train_last: int = option(
        0,
        "also train the model's last N layers, its final norm and its LM head (unless the head is tied to the "
        "input embeddings, as in the default model: then it stays). Default: 0",
        metavar="N",
    )
    train_dtype: str = option(
        "auto",
        "precision of the training forward/backward (torch.autocast; frozen weights "
        "stored in it, trained weights kept in fp32). auto: bf16 on GPU and on CPUs where a "
        "quick matrix-multiply timing finds bf16 faster (not every CPU with AVX512-BF16 is), "
        "else fp32. The saved model and all perplexities use --dtype.",
        choices=("auto", "fp32", "bf16"),
    )
    checkpoint_every: int = option(50, "write a checkpoint every K steps.")


# Options that define the training trajectory: a resumed run must use the same values.
TRAJECTORY_OPTIONS = tuple(name for name in option_names(TrainOptions) if name != "checkpoint_every")


@dataclass
class TrainConfig(TrainOptions):
    """Everything that determines the training trajectory (saved in every checkpoint): the training options
    as resolved for one run, and when to checkpoint, evaluate and stop."""

    loss: str = override(DEFAULT_LOSS)
    train_dtype: str = override("fp32")  # autocast dtype of the training steps, resolved from --train-dtype
    keep_checkpoints: int = 2
    eval_every: int = 0
    max_minutes: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    @property
    def calibrate_steps(self) -> int:
        """The first steps, in which only the calibration vectors train (all of them: calibration only)."""
        if self.calibrate == "none":
            return 0
        if self.calibrate_share >= 1:
            return self.total_steps
        return max(1, min(self.total_steps - 1, round(self.calibrate_share * self.total_steps)))

    @property
    def weights_train(self) -> bool:
        """Whether the wide layers' weights (or LoRA adapters) train at all."""
        return self.calibrate == "none" or self.calibrate_share < 1

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"unknown --loss {self.loss!r}; use one of {', '.join(LOSSES)}.")
        positive = {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "tokens": self.tokens,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "lora_rank": self.lora_rank,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer (got {value!r}).")
        if self.seq_len < 2:
            raise UserError("--seq-len must be at least 2 tokens (one input and one target).")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive (got {self.lr}).")
        if not 0 <= self.warmup < 1:
            raise UserError(f"--warmup is a fraction of the steps in [0, 1) (got {self.warmup}).")
        if self.neighbours < 0 or self.eval_every < 0 or self.train_last < 0:
            raise UserError("--neighbours, --train-last and --eval-every must be >= 0.")
        if not self.block_weight >= 0:
            raise UserError(f"--block-weight must be >= 0 (got {self.block_weight}).")
        if self.loss == "blocks" and (self.neighbours or self.train_last):
            raise UserError(
                "--loss blocks trains each wide layer on its own error, which never reaches the "
                "--neighbours or --train-last layers; use --loss distill --block-weight W to train them as well."
            )
        if self.train_last and self.lora:
            raise UserError("--train-last trains full weights; it does not combine with --lora.")
        if self.block_weight and self.loss != "distill":
            raise UserError(
                f"--block-weight adds the blocks loss to --loss distill, not to --loss {self.loss}; "
                "drop --block-weight (--loss blocks is the blocks loss alone)."
            )
        self.validate_calibration()
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"--max-minutes must be positive (got {self.max_minutes}).")

    def validate_calibration(self) -> None:
        if self.calibrate not in CALIBRATE:
            raise UserError(f"unknown --calibrate {self.calibrate!r}; use one of {', '.join(CALIBRATE)}.")
        if self.calibrate == "none":
            if self.calibrate_share != 1.0 or self.calibrate_lr != CALIBRATE_LR:
                raise UserError("--calibrate-share and --calibrate-lr set the calibration: pass --calibrate as well.")
            return
        if not 0 < self.calibrate_share <= 1:
            raise UserError(f"--calibrate-share is a share of the steps in (0, 1] (got {self.calibrate_share}).")
        if not self.calibrate_lr > 0:
            raise UserError(f"--calibrate-lr must be positive (got {self.calibrate_lr}).")
        if self.lora:
            raise UserError("--calibrate trains vectors folded into the full weights; it does not combine with --lora.")
        if (self.neighbours or self.train_last) and not self.weights_train:
            raise UserError(
                "--calibrate-share 1 trains only the wide layers' calibration vectors, never the --neighbours "
                "or --train-last layers; drop them or pass --calibrate-share below 1."
            )

    def trajectory(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRAJECTORY_OPTIONS}


@dataclass
class FinetuneData:
    """The training text (compress composes it with its own default)."""

    group_title = "training"
    data: str = option(
        "default",
        "training text: 'default' = the five Austen novels other than the held-out one, "
        "or any text spec of `eval --text` (austen:<name>, a .txt path, a datasets name).",
    )


@dataclass
class FinetuneTime:
    group_title = "training"
    max_minutes: float | None = option(
        None,
        "stop training after this many minutes of training steps (evaluation "
        "excluded); the run is saved and summarised as usual",
    )
    fit_tokens: bool = option(
        False,
        "set --tokens from one timed training step so that the whole schedule (warm-up, "
        "cosine decay) ends inside --max-minutes, instead of being cut off at a high learning rate",
    )


@dataclass
class FinetuneOutput:
    group_title = "output and resuming"
    resume: bool = option(False, "continue from the latest checkpoint in --out")
    keep_checkpoints_after: bool = option(
        False,
        "keep the last checkpoints after a finished run (default: removed "
        "once the model is saved; a run stopped by --max-minutes always keeps "
        "them, so it can be resumed)",
        flag="--keep-checkpoints",
    )


@dataclass
class FinetuneEval:
    group_title = "evaluation"
    eval_every: int = option(
        0,
        "also score the held-out text every K steps and at step 0, for recovery vs tokens; "
        "these points are scored with the training copy (frozen weights in --train-dtype). "
        "Default: off",
    )
    no_eval: bool = option(False, "skip every perplexity evaluation")


@dataclass
class FinetuneOptions(
    QuietOption,
    FinetuneEval,
    EvalTextOptions,
    OverwriteOption,
    FinetuneOutput,
    OutDirOption,
    ThreadsOption,
    FinetuneTime,
    TrainOptions,
    FinetuneData,
    PlanOption,
    ModelOptions,
):
    """Everything `truedepth finetune` takes (see its --help; the options come in the order of the bases from
    the last). On --resume, an option left at its default takes the checkpoint's value."""

    plan: str | None = override(
        None,
        help_note="It must contain a parallel group.",
        default_help=f"{DEFAULT_PLAN}, or the recorded plan of an already transformed --model",
    )
    out: str | None = override(None, required=True, help_note="(the fine-tuned model, summary, plot, checkpoints)")
    overwrite: bool = override(False, help_note="(a finished run in --out, or a non-empty folder that is not a run)")
