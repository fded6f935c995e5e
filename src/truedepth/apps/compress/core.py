"""The stages of `truedepth compress`, the checks before them, and how a rerun resumes them.

search -> generate -> finetune -> evaluate -> save. Each finished stage is recorded in
`DIR/stages/<stage>.json` (written atomically) with the options that produced it. A rerun skips
finished stages whose options are unchanged, refuses to go on when an option a finished stage used
has changed (naming the option and the stage), and resumes an interrupted generation or fine-tune
where it stopped (finished parts of generated text, the fine-tune's latest checkpoint in `DIR/finetune`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...utils.io import atomic_write_json
from ..finetune.config import SUMMARY_FILE as FT_SUMMARY_FILE, TrainConfig
from ..search.run import SearchOptions, check_search_dtype

STAGES = ("search", "generate", "finetune", "evaluate", "save")

# Planned share of --budget-minutes per stage. The search cannot stop half-way (its cost is set by the
# model and the calibration options); generation stops at its share. The fine-tune gets what is left
# once the evaluation's share is set aside, and fits its schedule to that time (finetune's
# --max-minutes with the tokens fitted to it); the evaluation (four models on two texts) keeps its share.
BUDGET_SHARES = {"search": 0.20, "generate": 0.10, "finetune": 0.50, "evaluate": 0.20, "save": 0.0}

# The options each stage's result depends on; a later stage also depends on every earlier one.
STAGE_INPUTS = {
    "search": ("model", "target_depth", "dtype", "data", "calib_windows", "calib_length", "select_windows",
               "search_dtype"),
    "generate": ("generate_tokens", "budget_minutes"),
    "finetune": ("loss", "tokens", "corpus_share", "seq_len", "batch_size", "lr", "neighbours", "train_dtype",
                 "budget_minutes"),
    "evaluate": ("eval_text", "other_text", "eval_tokens", "eval_window", "tasks", "limit", "decode_tokens"),
    "save": (),
}

STAGE_DIR = "stages"
FINETUNE_DIR = "finetune"
GENERATED_DIR = "generated"
TRAIN_FILE = "train.txt"
SUMMARY_FILE = "compress.json"


@dataclass
class CompressOptions:
    """Everything `truedepth compress` takes (see its --help); the defaults are the command's."""
    model: str = "default"
    target_depth: int | None = None
    budget_minutes: float = 60.0
    out: str | None = None
    overwrite: bool = False
    dtype: str | None = None
    device: str | None = None
    data: str = "austen-train+fortunes"  # search calibration and fine-tuning text: novels and varied short texts
    eval_text: str = "default"
    other_text: str = "other-domain"
    eval_tokens: int = 32768
    eval_window: int = 512
    tasks: str | None = None
    limit: int | None = None
    calib_windows: int = SearchOptions.calib_windows
    calib_length: int = SearchOptions.calib_length
    select_windows: int = SearchOptions.select_windows
    search_dtype: str | None = "auto"  # bf16 where it is faster (most CPUs with AVX512-BF16 or AMX, GPUs)
    # text the base model samples itself, for data-free distillation (0: none; measured worse than the
    # novels alone on both measuring texts, docs/COMPRESS.md, so off by default)
    generate_tokens: int = 0
    corpus_share: float | None = None  # share of --data in the fine-tuning text; None: 1 alone, 0.5 with generated
    loss: str = TrainConfig.loss
    tokens: int | None = None  # None: as many as fit in the fine-tune's time
    seq_len: int = TrainConfig.seq_len
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    neighbours: int = TrainConfig.neighbours  # ordinary layers trained on each side of every wide block
    train_dtype: str = "auto"
    checkpoint_every: int = TrainConfig.checkpoint_every
    decode_tokens: int = 32
    threads: int | None = None
    quiet: bool = False
    command_line: str = "truedepth compress"


DEFAULT_OPTIONS = CompressOptions()


# =============================================================================================
# Checks before any work
# =============================================================================================
def model_config(model: str) -> Any:
    """The model's config (config.json only, no weights)."""
    from transformers import AutoConfig

    from ...core import hf  # noqa: F401  # registers the truedepth model types, to name them in the error
    from ...core.loading import resolve

    return AutoConfig.from_pretrained(resolve(model), trust_remote_code=False)


def check_target_depth(config: Any, depth: int | None, model: str) -> int:
    """The model's depth; raises unless 1 <= depth < model depth and the search can reach it."""
    from ..search.core import max_reduction

    if getattr(config, "truedepth", None):
        raise ValueError(f"{model} is already transformed (plan {config.truedepth['plan']}); pass the original "
                         "model: the search and the distillation teacher need its layers.")
    layers = config.num_hidden_layers
    if depth is None:
        raise ValueError(f"give --target-depth D with 1 <= D < {layers} (the depth of {model}).")
    lowest = layers - max_reduction(layers, SearchOptions.max_group, SearchOptions.allow_skip)
    if not 1 <= depth < layers:
        raise ValueError(f"--target-depth {depth} is out of range: {model} has {layers} layers, so pass "
                         f"{max(lowest, 1)} <= D <= {layers - 1}.")
    if depth < lowest:
        raise ValueError(f"--target-depth {depth} is below what groups of up to {SearchOptions.max_group} layers "
                         f"reach on {layers} layers; pass --target-depth {lowest} or more.")
    return layers


def check_options(opts: CompressOptions) -> None:
    # --tokens, --seq-len, --batch-size, --checkpoint-every: the fine-tune's own checks (TrainConfig, below)
    positive = {"eval_tokens": opts.eval_tokens, "eval_window": opts.eval_window,
                "calib_windows": opts.calib_windows, "calib_length": opts.calib_length,
                "decode_tokens": opts.decode_tokens}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
    if opts.generate_tokens < 0:
        raise ValueError(f"--generate-tokens must be 0 (no generated text) or more (got {opts.generate_tokens}).")
    if opts.corpus_share is None:
        opts.corpus_share = 0.5 if opts.generate_tokens else 1.0
    if not 0 <= opts.corpus_share <= 1:
        raise ValueError(f"--corpus-share is the share of --data in the fine-tuning text, in [0, 1] "
                         f"(got {opts.corpus_share}).")
    if opts.generate_tokens == 0 and opts.corpus_share < 1:
        raise ValueError(f"--corpus-share {opts.corpus_share:g} asks for generated text but --generate-tokens is 0; "
                         "pass --corpus-share 1 to fine-tune on --data alone, or --generate-tokens N.")
    if opts.generate_tokens and opts.corpus_share == 1:
        raise ValueError("--corpus-share 1 fine-tunes on --data alone, so generated text would go unused; pass "
                         "--generate-tokens 0 as well.")
    if not opts.budget_minutes > 0:
        raise ValueError(f"--budget-minutes must be positive (got {opts.budget_minutes}).")
    if opts.eval_tokens < opts.eval_window:
        raise ValueError(f"--eval-tokens ({opts.eval_tokens}) must be at least one --eval-window ({opts.eval_window}).")
    from ...measure.eval.data import text_parts

    # a '+' spec joins texts: none of its parts may be a measuring text
    if {opts.data, *text_parts(opts.data)} & {opts.eval_text, opts.other_text}:
        raise ValueError(f"--data {opts.data!r} is also a text the result is measured on; train and calibrate on "
                         "other text (the default austen-train+fortunes never overlaps either measuring text).")
    check_search_dtype(opts.search_dtype)
    # the fine-tune's own checks (--lr, --seq-len, --neighbours with --loss blocks, ...): here, not after the search
    TrainConfig(loss=opts.loss, seq_len=opts.seq_len, batch_size=opts.batch_size,
                tokens=1 if opts.tokens is None else opts.tokens,  # None: fitted to the time left
                lr=opts.lr, neighbours=opts.neighbours, checkpoint_every=opts.checkpoint_every).validate()
    if opts.tasks is not None:
        from ...measure.eval.evaluate import task_list

        if not task_list(opts.tasks):
            raise ValueError("--tasks is empty; pass task names separated by commas, e.g. --tasks truedepth_mmlu.")


def check_output(out: Path, overwrite: bool) -> None:
    """An output folder is new, empty, an earlier compress run of its own, or replaced by --overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder.")
    if not out.is_dir() or not any(out.iterdir()) or (out / STAGE_DIR).is_dir() or overwrite:
        return
    raise ValueError(f"--out {out} holds something other than a compress run; pass --overwrite to replace it, "
                     "or choose another --out.")


def layer_and_head_weights(config: Any) -> tuple[int, int]:
    """Matrix weights one token passes through in one decoder layer, and in the output head."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * config.intermediate_size
    return per_layer, h * config.vocab_size


def weight_count(config: Any) -> int:
    """Matrix weights one token passes through (decoder layers and the output head), from the config."""
    per_layer, head = layer_and_head_weights(config)
    return config.num_hidden_layers * per_layer + head


def search_floor_flops(config: Any, opts: CompressOptions) -> float:
    """Matmul flops the search stage cannot do without, whatever the beam finds: the original model on
    the calibration and the selection windows, every candidate group scored alone (from its first layer
    to the output head: the layers before it are recorded once) and one finalist on the selection
    windows. The beam and the refinement, most of the search, come on top."""
    from ..search.core import candidate_elements

    per_layer, head = layer_and_head_weights(config)
    layers = config.num_hidden_layers
    whole = layers * per_layer + head
    alone = sum((layers - e.start) * per_layer + head
                for e in candidate_elements(layers, SearchOptions.max_group, SearchOptions.allow_skip))
    calib, select = opts.calib_windows * opts.calib_length, opts.select_windows * opts.calib_length
    return 2 * (calib * (whole + alone) + select * 2 * whole)


def least_seconds(config: Any, opts: CompressOptions) -> tuple[float, float, str]:
    """Lower bounds of the search stage's time and of one fine-tuning step's, and the device: their flops at
    the matmul speed measured on the device (a fraction of a second) in the dtypes they will run in. A real
    step (backward pass, teacher) costs about three times more; the whole search on the default model took 2.0
    (bf16) and 4.3 (fp32) times its floor on a 2-core Intel Xeon VM (docs/COMPRESS.md)."""
    from ...measure.bench.timing import matmul_flops
    from ..finetune.config import FinetuneOptions
    from ..finetune.run import resolve_precision
    from ..search.run import scoring_dtype

    device, model_dtype, train_dtype = resolve_precision(FinetuneOptions(device=opts.device, dtype=opts.dtype,
                                                                         train_dtype=opts.train_dtype))
    search_dtype = scoring_dtype(opts.search_dtype, model_dtype, device)
    step = 2 * weight_count(config) * opts.batch_size * opts.seq_len / matmul_flops(device, train_dtype)
    return search_floor_flops(config, opts) / matmul_flops(device, search_dtype), step, device


def check_budget(opts: CompressOptions, config: Any, searched: bool) -> None:
    """Refuse a budget whose fine-tuning time, after the least time the search can take, is shorter than one
    training step: the search cannot stop half-way, so it would run on and leave the fine-tune nothing."""
    search, step, device = least_seconds(config, opts)
    search = 0.0 if searched else search
    finetune_end = sum(BUDGET_SHARES[s] for s in STAGES[: STAGES.index("finetune") + 1])
    left = opts.budget_minutes * 60 * finetune_end - search
    if left < step:
        need = math.ceil((search + step) / (60 * finetune_end) * 10) / 10  # up: a budget that passes
        after = (f" after the search's least time ({search / 60:.2g} min; the whole search takes several times that)"
                 if search else "")
        raise ValueError(f"--budget-minutes {opts.budget_minutes:g} leaves {max(left, 0):.3g} s for fine-tuning"
                         f"{after}, less than one training step (about {step:.3g} s or more on {device}); "
                         f"pass --budget-minutes {need:g} or more.")


def check_inputs(opts: CompressOptions) -> tuple[int, str]:
    """Everything that can be refused before any work: returns (model depth, device)."""
    from ...utils.device import device_and_dtype

    if not opts.out:
        raise ValueError("give --out DIR, the folder that will hold the compressed model.")
    check_options(opts)
    config = model_config(opts.model)
    layers = check_target_depth(config, opts.target_depth, opts.model)
    check_output(Path(opts.out), opts.overwrite)
    check_budget(opts, config, searched=read_stage(Path(opts.out), "search") is not None and not opts.overwrite)
    device, _ = device_and_dtype(opts.device, opts.dtype)
    return layers, device


# =============================================================================================
# Stage records
# =============================================================================================
def stage_inputs(opts: CompressOptions, stage: str) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in STAGE_INPUTS[stage]}


def stage_path(out: Path, stage: str) -> Path:
    return out / STAGE_DIR / f"{stage}.json"


def read_stage(out: Path, stage: str) -> dict[str, Any] | None:
    path = stage_path(out, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def write_stage(out: Path, stage: str, opts: CompressOptions, seconds: float, result: dict[str, Any]) -> dict:
    record = {"stage": stage, "inputs": stage_inputs(opts, stage), "seconds": round(seconds, 2),
              "budget_seconds": round(opts.budget_minutes * 60 * BUDGET_SHARES[stage], 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}
    atomic_write_json(stage_path(out, stage), record)
    return record


def check_unchanged(out: Path, opts: CompressOptions) -> None:
    """Refuse options that differ from those a finished stage used (its result would be stale)."""
    for stage in STAGES:
        record = read_stage(out, stage)
        if record is None:
            continue
        for key, now in stage_inputs(opts, stage).items():
            # A stage recorded before an option existed ran as that option's default does.
            was = record["inputs"].get(key, getattr(DEFAULT_OPTIONS, key))
            if was != now:
                raise ValueError(f"--{key.replace('_', '-')} is {now!r} but the finished stage '{stage}' in {out} used "
                                 f"{was!r}; rerun with the same options to resume, pass --overwrite to start over, "
                                 "or choose another --out.")


# =============================================================================================
# The stages
# =============================================================================================
def contiguous_plan(layers: int, depth: int) -> str | None:
    """The paper's scheme at `depth`: one contiguous range of pairs, ending two layers below the top.

    On the default model the best contiguous range on calibration text ends there at every depth
    from 28 to 22 (docs/SEARCH.md). None when pairs cannot reach `depth`.
    """
    width = 2 * (layers - depth)
    if width > layers:
        return None
    start = max(0, layers - 2 - width)
    return f"parallel={start}:{start + width}"


def run_search_stage(opts: CompressOptions) -> dict[str, Any]:
    from ...core.plan import as_plan
    from ..search.run import run_search

    summary = run_search(SearchOptions(
        model=opts.model, dtype=opts.dtype, device=opts.device, target_depth=str(opts.target_depth), calib=opts.data,
        calib_windows=opts.calib_windows, calib_length=opts.calib_length, select_windows=opts.select_windows,
        search_dtype=opts.search_dtype, report="none", threads=opts.threads, quiet=opts.quiet, command=opts.command_line))
    found = summary["found"][0]
    return {"plan": found["plan"], "plan_string": str(as_plan(found["plan"])), "depth": found["depth"],
            "summary": summary}


def stage_seconds_left(opts: CompressOptions, records: dict[str, dict], stage: str) -> float:
    """Seconds a stage that stops by time may use: the budget up to the end of its share, less what the
    earlier stages used (so a fast search leaves its rest to generation and fine-tuning)."""
    end = sum(BUDGET_SHARES[s] for s in STAGES[: STAGES.index(stage) + 1])
    used = sum(r["seconds"] for r in records.values())
    return max(opts.budget_minutes * 60 * end - used, 0.06)  # a slow search: still one step


def run_generate_stage(opts: CompressOptions, out: Path, max_seconds: float) -> dict[str, Any]:
    """Text the base model samples itself (data-free distillation), in resumable parts under DIR/generated."""
    from ...core.loading import load
    from ...utils.device import as_dtype, device_and_dtype
    from ..finetune.selfdata import generate_text

    if not opts.generate_tokens:
        return {"tokens": 0, "parts": 0, "seconds": 0.0, "stopped_by": None}
    device, dtype_name = device_and_dtype(opts.device, opts.dtype)
    model, tokenizer = load(opts.model, dtype=as_dtype(dtype_name), device=device)
    return generate_text(model, tokenizer, out / GENERATED_DIR, opts.generate_tokens, max_seconds=max_seconds,
                         progress=not opts.quiet) | {"max_seconds": round(max_seconds, 1)}


def training_data(opts: CompressOptions, out: Path) -> str:
    """The fine-tune's --data: --data itself, or DIR/train.txt, generated text mixed with evenly spaced
    chunks of --data."""
    from ..finetune.run import training_text_for
    from ..finetune.selfdata import mix_texts, read_generated
    from ...utils.io import atomic_write

    if opts.corpus_share >= 1:
        return opts.data
    text = mix_texts(read_generated(out / GENERATED_DIR), training_text_for(opts.data), opts.corpus_share)
    path = out / TRAIN_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write(path, text)
    return str(path)


def run_finetune_stage(opts: CompressOptions, out: Path, plan: str, max_minutes: float) -> dict[str, Any]:
    from ..finetune.checkpoint import latest_checkpoint
    from ..finetune.config import FinetuneOptions
    from ..finetune.run import run_finetune

    folder = out / FINETUNE_DIR
    summary_file = folder / FT_SUMMARY_FILE
    resume = latest_checkpoint(folder) is not None
    if summary_file.is_file() and not resume:
        print(f"finetune: {folder} already holds the fine-tuned model; using it")  # stopped before its record
    else:
        data = training_data(opts, out)
        if resume:
            print(f"finetune: resuming from {latest_checkpoint(folder)}")
        # the evaluate stage measures every model on the same texts, so the fine-tune only trains
        rc = run_finetune(FinetuneOptions(
            model=opts.model, dtype=opts.dtype, device=opts.device, plan=plan, data=data,
            tokens=None if resume else opts.tokens, fit_tokens=opts.tokens is None, seq_len=opts.seq_len,
            batch_size=opts.batch_size, loss=opts.loss, lr=opts.lr, neighbours=opts.neighbours, max_minutes=max_minutes,
            train_dtype=opts.train_dtype, threads=opts.threads, out=str(folder), resume=resume,
            checkpoint_every=opts.checkpoint_every, no_eval=True, quiet=opts.quiet))
        if rc != 0:
            raise RuntimeError(f"the fine-tune in {folder} stopped before its end; rerun the same command to resume it.")
    summary = json.loads(summary_file.read_text())
    keep = ("steps", "tokens", "finished", "stopped_by", "train_seconds", "tokens_per_second", "loss", "train_dtype",
            "history", "epochs")
    return {k: summary.get(k) for k in keep} | {"max_minutes": round(max_minutes, 3)}


def measured_perplexities(opts: CompressOptions, texts: dict[str, str], label: str, plan: str | None = None,
                          folder: Path | None = None) -> dict[str, float]:
    """Perplexity of one model on each text. Models without training (base, a plan applied to the base)
    come from finetune's cache when measured before with the same weights, texts and sizes, without
    loading them."""
    from ...core.loading import load
    from ...utils.device import as_dtype, device_and_dtype
    from ..finetune.config import FinetuneOptions
    from ..finetune.report import perplexities
    from ..finetune.run import cached_perplexities, texts_digest

    device, dtype_name = device_and_dtype(opts.device, opts.dtype)
    dtype = as_dtype(dtype_name)

    def measure() -> dict[str, float]:
        model, tokenizer = load(folder or opts.model, dtype=dtype, device=device, plan=plan)
        return perplexities(model, tokenizer, texts, opts.eval_tokens, opts.eval_window, device, dtype, not opts.quiet)

    if folder is not None:
        return measure()
    args = FinetuneOptions(model=opts.model, eval_tokens=opts.eval_tokens, eval_window=opts.eval_window)
    return cached_perplexities(measure, args, label, texts_digest(texts), dtype, device)


def run_evaluate_stage(opts: CompressOptions, out: Path, layers: int, plan: str) -> dict[str, Any]:
    """Perplexity of the base model, the paper's contiguous plan, the searched plan (both without training) and
    the fine-tuned model on the same texts; the lm-eval tasks; decode speed of base and compressed model."""
    from ...core.loading import load
    from ...measure.bench.speed import interleaved_decode_rates
    from ...measure.eval.data import load_text
    from ...utils.device import as_dtype, device_and_dtype

    texts = {"held_out": load_text(opts.eval_text)}
    if opts.other_text.lower() != "none":
        texts["other_domain"] = load_text(opts.other_text)
    contiguous = contiguous_plan(layers, opts.target_depth)
    measured = {"base": measured_perplexities(opts, texts, "base"),
                "contiguous": measured_perplexities(opts, texts, contiguous, plan=contiguous) if contiguous else {},
                "searched": measured_perplexities(opts, texts, plan, plan=plan),
                "fine-tuned": measured_perplexities(opts, texts, "fine-tuned", folder=out / FINETUNE_DIR)}
    ppl = {name: {model: values.get(name) for model, values in measured.items()} for name in texts}
    device, dtype_name = device_and_dtype(opts.device, opts.dtype)
    dtype = as_dtype(dtype_name)
    base, tokenizer = load(opts.model, dtype=dtype, device=device)
    compressed, _ = load(out / FINETUNE_DIR, dtype=dtype, device=device)
    models = {"base": base, "fine-tuned": compressed}
    speed = interleaved_decode_rates(models, tokenizer, new_tokens=opts.decode_tokens, progress=not opts.quiet)
    result: dict[str, Any] = {"contiguous_plan": contiguous, "perplexity": ppl, "eval_tokens": opts.eval_tokens,
                              "eval_window": opts.eval_window, "decode_tokens_per_second": speed,
                              "depth": {"base": layers, "fine-tuned": compressed.config.num_hidden_layers}}
    if opts.tasks:
        from ...measure.eval.evaluate import EvalOptions, run_tasks

        task_opts = EvalOptions(tasks=opts.tasks, limit=opts.limit)
        result["tasks"] = {name: run_tasks(m, tokenizer, task_opts) for name, m in models.items()}
    return result


def run_save_stage(out: Path) -> dict[str, Any]:
    """Put the fine-tuned model and its tokenizer at the top of DIR (hard links: no second copy)."""
    folder = out / FINETUNE_DIR
    linked = []
    for src in sorted(folder.iterdir()):
        if src.is_file() and src.name != FT_SUMMARY_FILE:
            dst = out / src.name
            tmp = out / f".{src.name}.{os.getpid()}.tmp"
            try:
                os.link(src, tmp)
            except OSError:  # another file system: a copy
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
            linked.append(src.name)
    return {"files": linked}


def options_record(opts: CompressOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(opts).items() if k not in ("quiet", "command_line")}
