"""Fine-tune only the parallelized (wide) layers of an LP model to win quality back (`truedepth finetune`).

config.py: the training options (TrainOptions), the trajectory record (TrainConfig), FinetuneOptions and the
file names; pipeline.py: a run end to end; model.py: student, teacher, LoRA, memory; train.py: batches,
losses, the resumable loop; blockloss.py: the blocks loss; calibrate.py: per-member vectors folded into the
weights (`--calibrate`); checkpoint.py; selfdata.py: text the base model generates itself; report.py: the
summary and plots.

The names below are the package's public API (what `apps.compress` and scripts use).
"""

from .checkpoint import latest_checkpoint
from .config import (
    CURVE_FILE,
    DEFAULT_LOSS,
    DEFAULT_PLAN,
    LOSSES,
    SUMMARY_FILE,
    TRAJECTORY_OPTIONS,
    FinetuneData,
    FinetuneOptions,
    TrainConfig,
    TrainOptions,
)
from .pipeline import run_finetune
from .selfdata import check_chat_template, generate_text, mix_texts, question_pools, read_generated

__all__ = [
    "CURVE_FILE",
    "DEFAULT_LOSS",
    "DEFAULT_PLAN",
    "LOSSES",
    "SUMMARY_FILE",
    "TRAJECTORY_OPTIONS",
    "FinetuneData",
    "FinetuneOptions",
    "TrainConfig",
    "TrainOptions",
    "check_chat_template",
    "generate_text",
    "latest_checkpoint",
    "mix_texts",
    "question_pools",
    "read_generated",
    "run_finetune",
]
