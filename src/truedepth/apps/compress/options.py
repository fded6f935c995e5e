"""`truedepth compress`'s options: composed of the search's calibration group, the fine-tune's training group
and the measuring texts (each declared once, where it belongs), plus compress's own; the stage names, and
which options each stage's result depends on."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.loading import ModelOptions
from ...measure.bench.serving import EngineOptions
from ...measure.eval.evaluate import TaskOptions
from ...measure.eval.fidelity import MmluChatOption
from ...measure.eval.heldout import EvalTextOptions
from ...utils.options import option, option_names, override
from ...utils.shared_options import OutDirOption, OverwriteOption, QuietOption, ThreadsOption
from ..finetune import DEFAULT_LOSS, TRAJECTORY_OPTIONS, FinetuneData, TrainOptions
from ..search import CalibrationOptions


@dataclass
class CompressRun:
    target_depth: int | None = option(
        None,
        "layers the compressed model runs one after another (1 <= D < the model's depth)",
        metavar="D",
        required=True,
    )
    budget_minutes: float = option(60.0, "wall time for the whole command, split across the stages.")


@dataclass
class CompressGenerated:
    group_title = "training"
    generate_tokens: int = option(
        0,
        "tokens of text the base model generates itself (--generate-from) to distil on as well. 0: none (on "
        "the default model neither kind beat the training text alone at equal tokens, docs/COMPRESS.md). Default: 0",
    )
    generate_from: str = option(
        "bos",
        "what the base model generates: bos: samples from the BOS token alone (temperature 1); chat: its "
        "answers (temperature 0.7) to questions built from offline training material (WordNet words to "
        "define or write about, fortunes to explain, MMLU's few-shot questions) through its chat template: "
        "self-distillation on its own answers",
        choices=("bos", "chat"),
    )
    corpus_share: float | None = option(
        None,
        "share of --data in the fine-tuning text, the rest generated. Default: 1 "
        "without --generate-tokens, 0.5 with it",
    )


FIDELITY_TOKENS = 8192  # --fidelity-tokens' default (or --eval-tokens if fewer)


@dataclass
class CompressFidelity:
    group_title = "evaluation"
    fidelity_tokens: int | None = option(
        None,
        "tokens of each measuring text on which the contiguous plan, the searched plan and the fine-tuned "
        "model are compared with the base model: top-1 agreement with its next token and KL divergence "
        f"from it (the first tokens, in --eval-window windows); 0: not compared. Default: {FIDELITY_TOKENS}, "
        "or --eval-tokens if fewer",
    )


@dataclass
class CompressTail:
    decode_tokens: int = option(32, "new tokens per decode-speed run.")


@dataclass
class CompressOptions(
    EngineOptions,
    QuietOption,
    ThreadsOption,
    CompressTail,
    CompressGenerated,
    TrainOptions,
    FinetuneData,
    CalibrationOptions,
    MmluChatOption,
    CompressFidelity,
    EvalTextOptions,
    TaskOptions,
    OverwriteOption,
    OutDirOption,
    CompressRun,
    ModelOptions,
):
    """Everything `truedepth compress` takes (see its --help; the options come in the order of the bases from
    the last); the defaults are the command's."""

    out: str | None = override(None, required=True, help_note="(the compressed model and its report)")
    overwrite: bool = override(False, help_note="(start over)")
    # search calibration and fine-tuning text: novels and varied short texts
    data: str = override(
        "austen-train+fortunes",
        help_note="Compress calibrates the search on it too (the search's --calib).",
        default_help="austen-train+fortunes: the five training novels and "
        "varied short texts, interleaved (other domain 1.126x base at depth 24 against 1.179x on "
        "the novels alone, docs/research/compress-experiments.md)",
    )
    eval_tokens: int = override(32768)
    mmlu_chat: int = override(0, help_note="Compress asks the base model and the fine-tuned one.")
    search_dtype: str | None = override("auto", default_help="auto (bf16 where the CPU or GPU is fast at it)")
    loss: str = override(DEFAULT_LOSS, default_help=DEFAULT_LOSS)  # compress refuses a transformed --model
    tokens: int | None = override(
        None,
        default_help="as many as fit in the fine-tune's time (timed on the first "
        "batch); training stops earlier when its time is up",
    )
    engine: str = override(
        "transformers",
        help_note="Compress: with vllm or llama.cpp, a last stage serves the saved model and the base model in "
        "that engine and measures them under load (time on top of --budget-minutes; rerun it alone later with "
        "the same --out and --engine).",
    )
    concurrency: str = override("1,8")
    command: str = "truedepth compress"  # the command line, recorded in compress.json (not an option)


# Fine-tuning options compress leaves at the fine-tune's defaults (not on its command line; a library caller
# may set them, and they count in the fine-tune stage's record)
HIDDEN_OPTIONS = (
    "block_weight",
    "warmup",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "seed",
    "lora",
    "lora_rank",
    "lora_alpha",
)

DEFAULT_OPTIONS = CompressOptions()

STAGES = ("search", "generate", "finetune", "evaluate", "save", "serve")

# The options each stage's result depends on; a later stage also depends on every earlier one. A record
# written before an option existed counts as that option's default (stages.check_unchanged).
STAGE_INPUTS = {
    "search": ("model", "target_depth", "dtype", "data", *option_names(CalibrationOptions)),
    "generate": ("generate_tokens", "generate_from", "budget_minutes"),
    "finetune": (*TRAJECTORY_OPTIONS, "corpus_share", "budget_minutes"),
    "evaluate": (
        *option_names(EvalTextOptions),
        *option_names(TaskOptions),
        "decode_tokens",
        "fidelity_tokens",
        "mmlu_chat",
    ),
    "save": (),
    "serve": option_names(EngineOptions),
}

STAGE_DIR = "stages"
FINETUNE_DIR = "finetune"
GENERATED_DIR = "generated"
TRAIN_FILE = "train.txt"
SUMMARY_FILE = "compress.json"
