"""Fine-tune only the parallelized (wide) layers of an LP model to win quality back.

Only the parameters of the wide layers -- the fused parallel groups -- are trained; every other
weight stays frozen (`--neighbours N` also trains the N ordinary layers on each side of every wide
block). Two losses:

  lm       next-token cross-entropy on the training text
  distill  KL(teacher || student) on the next-token distributions, where the teacher is the same
           model before the plan. The teacher shares every frozen weight with the student, so it
           costs only one extra copy of the original layers that the plan fused.

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
CPUs with AMX/AVX512-BF16, about 3x faster there; else fp32). The saved model and every perplexity
use --dtype (default fp32 on CPU, bf16 on GPU): the final model is rebuilt from the original
weights with the trained tensors put in, so frozen weights never pass through bf16.

Examples:
  truedepth finetune --plan parallel=20:28 --tokens 200000 --out runs/ft
  truedepth finetune --plan parallel=20:28 --loss distill --max-minutes 15 --out runs/ft-kd
  truedepth finetune --plan parallel=20:28 --out runs/ft --resume        # after an interruption
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

LOSSES = ("lm", "distill")
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
                      "grad_clip", "seed", "lora", "lora_rank", "lora_alpha", "neighbours", "train_dtype")


# =============================================================================================
# Options
# =============================================================================================
@dataclass
class TrainConfig:
    """Everything that determines the training trajectory (saved in every checkpoint)."""
    loss: str = "lm"
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
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be positive (got {self.max_minutes}).")

    def trajectory(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRAJECTORY_OPTIONS}


# =============================================================================================
# Which layers train, the student and the teacher
# =============================================================================================
def wide_layer_indices(model: Any) -> list[int]:
    """Indices (in the transformed model) of the wide layers: `layer_widths[i] > 1`."""
    info = getattr(model.config, "truedepth", None) or {}
    return [i for i, w in enumerate(info.get("layer_widths", [])) if w > 1]


def trainable_layer_indices(layer_widths: list[int], neighbours: int = 0) -> list[int]:
    """Wide layers plus `neighbours` ordinary layers on each side of every wide block."""
    wide = [i for i, w in enumerate(layer_widths) if w > 1]
    chosen = set(wide)
    for i in wide:
        chosen.update(j for j in range(i - neighbours, i + neighbours + 1) if 0 <= j < len(layer_widths))
    return sorted(chosen)


def check_plan_has_parallel_groups(plan: Any, recorded: dict[str, Any] | None = None) -> None:
    """Raise before any loading if there is nothing to fine-tune."""
    from .plan import as_plan

    if recorded is not None:
        if any(w > 1 for w in recorded.get("layer_widths", [])):
            return
        raise ValueError(f"the model's recorded plan '{as_plan(recorded['plan'])}' has no parallel groups, so "
                         "there are no wide layers to fine-tune; start from the original model with --plan "
                         f"{DEFAULT_PLAN} (or another plan with a parallel=A:B step).")
    plan = as_plan(plan)
    if not any(s.kind == "parallel" for s in plan.steps):
        raise ValueError(f"plan '{plan}' has no parallel groups, so there are no wide layers to fine-tune; "
                         f"pass a plan with a parallel=A:B step, e.g. --plan {DEFAULT_PLAN}.")


def build_student(base: Any, plan: Any, neighbours: int = 0) -> Any:
    """A transformed copy of `base` that shares every weight it will not train with `base`.

    `base` itself stays the original model (the distillation teacher and the 'base' perplexity).
    Only the layers the plan rewrites and the trainable neighbours are copied; all other
    parameters (embeddings, untouched layers, head) are the same tensors in both models.
    """
    from .plan import as_plan, widths
    from .transform import apply_plan, decoder_layers

    plan = as_plan(plan)
    layers = decoder_layers(base)
    blocks = plan.blocks(len(layers))
    trained_new = trainable_layer_indices(widths(blocks), neighbours)
    # never share what apply_plan rewrites (it moves fused members to meta) or what training changes
    private = {j for b in blocks if b.kind != "keep" for j in b.layers}
    private |= {j for i in trained_new for j in blocks[i].layers}
    own = {id(p) for j in private for p in layers[j].parameters()}
    memo = {id(p): p for p in base.parameters() if id(p) not in own}
    student = copy.deepcopy(base, memo)
    apply_plan(student, plan)
    return student


def freeze_all_but(model: Any, layer_indices: list[int]) -> list[str]:
    """Freeze every parameter except those of the given decoder layers; return the trained names."""
    from .transform import decoder_layers

    layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for i in layer_indices:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def add_lora(model: Any, layer_indices: list[int], rank: int, alpha: float) -> Any:
    """Wrap `model` with peft LoRA adapters on the linear modules of the given layers only."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError("--lora needs the peft package: pip install 'truedepth[finetune]' (or peft>=0.15).") from None
    picked = "|".join(str(i) for i in layer_indices)
    # a regex is matched against full module names, so only these layers get adapters
    target = rf"model\.layers\.({picked})\.(self_attn|mlp)\.[a-z_]+_proj"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, bias="none")
    return get_peft_model(model, config)


def cast_frozen(models: list[Any], dtype: torch.dtype) -> None:
    """Cast frozen parameters to `dtype` in place (shared tensors once); trainable ones stay fp32."""
    seen: set[int] = set()
    for model in models:
        for p in (model.parameters() if model is not None else ()):
            if id(p) in seen or p.requires_grad or p.dtype == dtype:
                continue
            seen.add(id(p))
            p.data = p.data.to(dtype)  # keeps the Parameter object, so sharing survives


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# =============================================================================================
# Data: fixed-length sequences in a seeded order that depends only on the step
# =============================================================================================
class TokenBatches:
    """Batches of `batch_size` sequences of `seq_len` tokens cut from one token stream.

    Sequence order is a permutation per epoch, seeded by (seed, epoch), so batch k is a pure
    function of k: resuming at a step needs no saved iterator, only the step number.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        self.num_sequences = ids.numel() // seq_len
        if self.num_sequences < 1:
            raise ValueError(f"the training data has {ids.numel()} tokens, shorter than one sequence of "
                             f"--seq-len {seq_len}; use a longer text or a smaller --seq-len.")
        if self.num_sequences < batch_size:
            raise ValueError(f"the training data holds only {self.num_sequences} sequence(s) of {seq_len} tokens, "
                             f"fewer than one batch of --batch-size {batch_size}; use a longer text or lower "
                             "--batch-size / --seq-len.")
        self.sequences = ids[: self.num_sequences * seq_len].view(self.num_sequences, seq_len)
        self.batch_size, self.seed = batch_size, seed
        self._orders: dict[int, torch.Tensor] = {}
        self.digest = hashlib.sha256(self.sequences.numpy().tobytes()).hexdigest()[:16]

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.num_sequences, generator=g)}
        return self._orders[epoch]

    def batch(self, step: int) -> torch.Tensor:
        rows = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, self.num_sequences)
            rows.append(int(self._order(epoch)[pos]))
        return self.sequences[rows]

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / self.num_sequences


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole text, no special tokens (long inputs are fine: no model limit here)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# =============================================================================================
# Losses
# =============================================================================================
def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (position t predicts token t+1), in float32."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between next-token distributions, in float32."""
    s = F.log_softmax(student_logits.float().flatten(0, 1), -1)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def compute_loss(student: Any, teacher: "Teacher | None", ids: torch.Tensor, loss: str) -> torch.Tensor:
    logits = student(input_ids=ids, use_cache=False).logits
    if loss == "lm":
        return lm_loss(logits, ids)
    with torch.no_grad():
        target = teacher(ids)  # after the student: it may start from the student's hidden state
    return distill_loss(logits, target)


def shared_prefix_length(blocks: list[Any], trained: list[int]) -> int:
    """How many leading layers the student runs exactly as the teacher does (same, frozen, in order)."""
    n = 0
    for i, block in enumerate(blocks):
        if block.kind != "keep" or block.layers != (i,) or i in trained:
            break
        n += 1
    return n


class Teacher:
    """Next-token logits of the model before the plan, the target of `--loss distill`.

    The student's first `split` layers are the teacher's own frozen layers in the same order, so
    their output is the same for both: with `split > 0`, a hook captures the student's hidden state
    (and the layer arguments: mask, rotary embeddings) where the two models start to differ, and
    the teacher runs only its remaining layers and the head. Call it right after the student's
    forward on the same ids.
    """

    def __init__(self, model: Any, student_layers: Any = None, split: int = 0):
        self.model, self.split, self._captured = model, split, None
        types = set(getattr(model.config, "layer_types", None) or [])
        if split and len(types) > 1:  # per-layer masks (sliding windows): only the full forward is safe
            self.split = 0
        self._hook = None
        if self.split:
            self._hook = student_layers[self.split].register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._captured = (args, kwargs)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.model(input_ids=ids, use_cache=False).logits
        if self._captured is None:
            raise RuntimeError("Teacher: run the student on the same ids first (its hidden state is reused).")
        (args, kwargs), self._captured = self._captured, None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inner = self.model.model
        for layer in inner.layers[self.split:]:
            hidden = layer(hidden, *args[1:], **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # transformers 4.x returned tuples
        return self.model.lm_head(inner.norm(hidden))

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


# =============================================================================================
# Memory: refuse a batch that cannot fit before training starts
# =============================================================================================
def unique_parameters(*models: Any) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for m in models:
        if m is not None:
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def estimate_training_memory(student: Any, teacher: Any | None, cfg: TrainConfig,
                             act_dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes that training adds on top of the loaded weights (a deliberately generous estimate).

    optimizer: fp32 gradient + two AdamW moments per trainable parameter;
    activations: tensors autograd keeps for every layer from the first trainable one to the end
    (hidden-size vectors, MLP intermediates, eager attention scores) -- layers before it run
    without a graph; logits: fp32 vocab-sized rows per token (logits, log-softmax, gradient; twice
    for distill, whose teacher has its own).
    """
    from .transform import decoder_layers

    cfg_m = student.config
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    widths = (getattr(cfg_m, "truedepth", None) or {}).get("layer_widths") or [1] * len(decoder_layers(student))
    first = min([i for i, w in enumerate(widths) if w > 1] or [0])
    tokens = cfg.tokens_per_step
    act_bytes = torch.finfo(act_dtype).bits // 8
    hidden, inter, heads = cfg_m.hidden_size, cfg_m.intermediate_size, cfg_m.num_attention_heads
    per_token = sum(16 * hidden + 5 * inter * w + 2 * heads * w * cfg.seq_len for w in widths[first:])
    logit_copies = 3 if cfg.loss == "lm" else 6
    parts = {
        "optimizer": trainable * 4 * 3,
        "activations": tokens * per_token * act_bytes,
        "logits": tokens * cfg_m.vocab_size * 4 * logit_copies,
    }
    parts["total"] = int(1.2 * sum(parts.values()))
    parts["weights"] = sum(p.numel() * p.element_size() for p in unique_parameters(student, teacher))
    return parts


def available_memory(device: torch.device | str) -> int:
    """Free bytes on the device: free GPU memory, or the OS's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # Linux fallback without psutil
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


def check_memory(student: Any, teacher: Any | None, cfg: TrainConfig, device: Any,
                 act_dtype: torch.dtype = torch.float32) -> dict[str, int]:
    need = estimate_training_memory(student, teacher, cfg, act_dtype)
    free = available_memory(device)
    if need["total"] > free:
        gib = 1024 ** 3
        raise RuntimeError(
            f"training needs an estimated {need['total'] / gib:.1f} GiB beyond the loaded weights "
            f"(optimizer {need['optimizer'] / gib:.2f}, activations {need['activations'] / gib:.2f}, logits "
            f"{need['logits'] / gib:.2f} GiB for batches of {cfg.batch_size} x {cfg.seq_len} tokens) but only "
            f"{free / gib:.1f} GiB is free on {device}; lower --batch-size or --seq-len"
            + (", or use --lora." if not cfg.lora else "."))
    return need


# =============================================================================================
# Checkpoints: safetensors + JSON, written atomically
# =============================================================================================
def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("torch_cuda_")), key=lambda k: int(k[11:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones never get a final name)."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` to a temporary folder, fsync it, then rename it into place.

    A kill at any moment leaves either the previous checkpoints or the new complete one. The
    `keep` newest checkpoints are kept.
    """
    from safetensors.torch import save

    root = Path(out) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    _write_bytes(tmp / "trainable.safetensors",
                 save({k: v.detach().cpu().contiguous() for k, v in trainable.items()}))
    _write_bytes(tmp / "optimizer.safetensors", save(opt_tensors))
    _write_bytes(tmp / "rng.safetensors", save(rng_state()))
    state = dict(meta, format=CHECKPOINT_FORMAT, step=step, optimizer=opt_meta, scheduler=scheduler.state_dict())
    _write_bytes(tmp / "state.json", json.dumps(state, indent=1).encode())  # last: marks it complete
    _fsync_dir(tmp)
    if final.exists():  # the same step written again after a resume: identical content
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"checkpoint {path} has format {state.get('format')}, this truedepth reads "
                           f"{CHECKPOINT_FORMAT}; resume it with the truedepth version that wrote it.")
    state["trainable"] = load_file(path / "trainable.safetensors")
    state["optimizer"] = unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
    state["rng"] = load_file(path / "rng.safetensors")
    return state


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


# =============================================================================================
# The training loop
# =============================================================================================
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` at the last step."""
    total = cfg.total_steps
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    step: int  # steps done in total (across resumes)
    tokens: int
    finished: bool  # reached the configured number of steps
    train_seconds: float  # wall time of training steps, across resumes
    history: list[dict[str, Any]] = field(default_factory=list)  # per step: step, tokens, loss, lr
    evals: list[dict[str, Any]] = field(default_factory=list)  # eval callback results
    stopped_by: str | None = None  # "max_minutes" or "stop_after"


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(student: Any, teacher: Teacher | None, data: TokenBatches, cfg: TrainConfig, out: Path | None,
          device: Any = "cpu", dtype: torch.dtype = torch.float32, resume: bool = False,
          stop_after: int | None = None, evaluate: Callable[[Any], dict[str, Any]] | None = None,
          meta: dict[str, Any] | None = None, progress: bool = True) -> TrainResult:
    """Train the student's trainable parameters with AdamW; checkpoint to `out`/checkpoints.

    `resume` restores the latest checkpoint in `out` (weights, optimizer, scheduler, RNG, step).
    `stop_after` stops after that many steps in total (used to simulate an interruption).
    `evaluate(model)` runs every `cfg.eval_every` steps and at the end; its dict is recorded.
    `meta` (JSON-able) is stored in checkpoints and returned in `resumed_meta` on resume.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.loss == "distill" and teacher is None:
        raise ValueError("--loss distill needs the teacher (the model before the plan).")
    params = trainable_state(student)
    if not params:
        raise ValueError("the model has no trainable parameters; is there a parallel group in the plan?")
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95), foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    result = TrainResult(step=0, tokens=0, finished=False, train_seconds=0.0)
    meta = dict(meta or {})
    if resume:
        result = _restore(out, params, optimizer, scheduler, cfg, data, meta)
    total = cfg.total_steps
    student.train()
    if teacher is not None:
        teacher.model.eval()
    started, last_saved = time.perf_counter(), result.step
    base_seconds = result.train_seconds
    if evaluate and cfg.eval_every and result.step == 0:
        result.evals.append(_run_eval(evaluate, student, result))  # the curve starts at the LP model
    bar = tqdm(total=total, initial=result.step, desc=f"finetune ({cfg.loss})", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        while result.step < total:
            if stop_after is not None and result.step >= stop_after:
                result.stopped_by = "stop_after"
                break
            if cfg.max_minutes is not None and result.train_seconds >= cfg.max_minutes * 60:
                result.stopped_by = "max_minutes"
                break
            loss = _train_step(student, teacher, data.batch(result.step).to(device), cfg, optimizer, scheduler,
                               params, device, dtype)
            result.step += 1
            result.tokens = result.step * cfg.tokens_per_step
            result.train_seconds = base_seconds + time.perf_counter() - started
            result.history.append({"step": result.step, "tokens": result.tokens, "loss": loss,
                                   "lr": scheduler.get_last_lr()[0], "seconds": round(result.train_seconds, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{_smoothed(result.history):.4f}",
                            tok_s=f"{result.tokens / max(result.train_seconds, 1e-9):.0f}")
            if evaluate and cfg.eval_every and result.step % cfg.eval_every == 0 and result.step < total:
                result.evals.append(_run_eval(evaluate, student, result))
            if out is not None and result.step % cfg.checkpoint_every == 0 and result.step < total:
                _checkpoint(out, result, params, optimizer, scheduler, cfg, data, meta)
                last_saved = result.step
    finally:
        bar.close()
    result.finished = result.step >= total
    if out is not None and not result.finished and result.step > last_saved:
        _checkpoint(out, result, params, optimizer, scheduler, cfg, data, meta)  # stopped early: keep progress
    result.resumed_meta = meta  # type: ignore[attr-defined]
    return result


def _train_step(student: Any, teacher: Teacher | None, ids: torch.Tensor, cfg: TrainConfig, optimizer: Any,
                scheduler: Any, params: dict[str, torch.Tensor], device: Any, dtype: torch.dtype) -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        loss = compute_loss(student, teacher, ids, cfg.loss)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip, foreach=False)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _smoothed(history: list[dict[str, Any]], n: int = 20) -> float:
    recent = [h["loss"] for h in history[-n:]]
    return sum(recent) / len(recent)


def _run_eval(evaluate: Callable[[Any], dict[str, Any]], student: Any, result: TrainResult) -> dict[str, Any]:
    student.eval()
    try:
        with torch.no_grad():
            record = dict(evaluate(student), step=result.step, tokens=result.tokens)
    finally:
        student.train()
    return record


def _checkpoint(out: Path, result: TrainResult, params: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
                cfg: TrainConfig, data: TokenBatches, meta: dict[str, Any]) -> None:
    info = dict(meta, config=asdict(cfg), trajectory=cfg.trajectory(), data_digest=data.digest,
                data_sequences=data.num_sequences, tokens=result.tokens, train_seconds=result.train_seconds,
                history=result.history, evals=result.evals)
    save_checkpoint(out, result.step, params, optimizer, scheduler, info, keep=cfg.keep_checkpoints)


def _restore(out: Path | None, params: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, cfg: TrainConfig,
             data: TokenBatches, meta: dict[str, Any]) -> TrainResult:
    path = latest_checkpoint(out) if out is not None else None
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {Path(out or '.') / CHECKPOINT_DIR}; run without "
                                "--resume to start training.")
    state = load_checkpoint(path)
    check_resumable(state, cfg, data, set(params))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    for key in ("base", "lp"):  # measurements made before training, so the summary stays complete
        if key in state:
            meta.setdefault(key, state[key])
    return TrainResult(step=state["step"], tokens=state["tokens"], finished=False,
                       train_seconds=state["train_seconds"], history=state["history"], evals=state["evals"])


def check_resumable(state: dict[str, Any], cfg: TrainConfig, data: TokenBatches, names: set[str]) -> None:
    """The checkpoint must come from the same trajectory: same options, data and parameters."""
    saved = state["trajectory"]
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in cfg.trajectory().items()
            if saved.get(k) != v]
    if diff:
        raise ValueError("--resume: the checkpoint was trained with " + ", ".join(diff) + "; pass the same "
                         "options as the first run (or start a new --out).")
    if state["data_digest"] != data.digest:
        raise ValueError("--resume: the training data differs from the data of the checkpoint; pass the same "
                         "--data (and --model, whose tokenizer cuts it) as the first run.")
    if set(state["trainable"]) != names:
        raise ValueError("--resume: the checkpoint's trainable parameters do not match this model; pass the same "
                         "--model and --plan as the first run.")


# =============================================================================================
# Evaluation, summary, plot
# =============================================================================================
def perplexities(model: Any, tokenizer: Any, texts: dict[str, str], tokens: int, window: int, device: Any,
                 dtype: torch.dtype, progress: bool = True) -> dict[str, float]:
    from .perplexity import perplexity

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, dtype):
            return {name: perplexity(model, tokenizer, text, tokens=tokens, window=window, progress=progress)["perplexity"]
                    for name, text in texts.items()}
    finally:
        model.train(was_training)


def recovered_fraction(base: float, lp: float, ft: float) -> float | None:
    """(ppl_LP - ppl_FT) / (ppl_LP - ppl_base): 1 = the whole LP gap won back, 0 = none, <0 = worse."""
    gap = lp - base
    return None if abs(gap) < 1e-12 else (lp - ft) / gap


def plot_curve(summary: dict[str, Any], path: Path) -> Path | None:
    """Training loss over tokens and (when evaluated) held-out perplexity over tokens."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'truedepth[plot]').", file=sys.stderr)
        return None
    history, evals = summary["history"], summary.get("evals") or []
    ncols = 2 if evals else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    x = [h["tokens"] for h in history]
    y = [h["loss"] for h in history]
    ax.plot(x, y, lw=0.6, alpha=0.4, label="per step")
    smooth = [sum(y[max(0, i - 19): i + 1]) / len(y[max(0, i - 19): i + 1]) for i in range(len(y))]
    ax.plot(x, smooth, lw=1.5, label="mean of 20 steps")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("KL(teacher || student) (nats)" if summary["loss"] == "distill" else "cross-entropy (nats)")
    ax.set_title(f"{summary['loss']} loss, plan {summary['plan']}")
    ax.legend()
    if evals:
        ax = axes[0][1]
        key = summary["eval_names"][0]
        ppl = summary["perplexity"][key]
        ax.plot([e["tokens"] for e in evals], [e[key] for e in evals], "o-", label="during training (training copy)")
        ax.plot([summary["tokens"]], [ppl["ft"]], "*", ms=12, label=f"saved model {ppl['ft']:.2f}")
        if ppl["base"] is not None:
            ax.axhline(ppl["base"], color="green", ls="--", label=f"base {ppl['base']:.2f}")
        ax.axhline(ppl["lp"], color="red", ls="--", label=f"LP before FT {ppl['lp']:.2f}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"perplexity ({key})")
        ax.set_title("held-out perplexity during fine-tuning")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recovery(summaries: list[str | Path], path: str | Path, text: str = "held_out") -> Path:
    """Recovered fraction of the perplexity gap vs training tokens for several finished runs.

    Each summary needs --eval-every points; the last point of each run is its saved model.
        python -c "from truedepth.finetune import plot_recovery as p; p(['runs/a', 'runs/b'], 'cmp.png')"
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for item in summaries:
        item = Path(item)
        s = json.loads((item / SUMMARY_FILE if item.is_dir() else item).read_text())
        ppl = s["perplexity"][text]
        points = [(e["tokens"], e["recovered"]) for e in s.get("evals", [])
                  if e.get(text) is not None and e.get("recovered") is not None and text == "held_out"]
        points = (points or [(0, 0.0)]) + [(s["tokens"], ppl["recovered"])]  # 0 tokens = the LP model: 0%
        label = f"{s['loss']}{' LoRA' if s['lora'] else ''} ({s['train_seconds'] / 60:.0f} min)"
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=label)
    ax.axhline(100, color="green", ls="--", lw=1, label="base model")
    ax.axhline(0, color="red", ls="--", lw=1, label="LP, no fine-tuning")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"recovered % of the {text.replace('_', '-')} perplexity gap")
    ax.set_title(f"plan {s['plan']}: (ppl_LP - ppl_FT) / (ppl_LP - ppl_base)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# =============================================================================================
# The command
# =============================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

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
                   help="lm: next-token cross-entropy; distill: KL to the model before the plan (default lm)")
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
    g.add_argument("--train-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="precision of the training forward/backward (torch.autocast; frozen weights stored in it, "
                        "trained weights kept in fp32). auto: bf16 on GPU and on CPUs with AMX/AVX512-BF16 "
                        "(~3x faster there), else fp32. The saved model and all perplexities use --dtype. "
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
    o.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
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


def fill_defaults(args: argparse.Namespace) -> None:
    """Defaults of the options left unset (None, so that --resume can tell given from omitted)."""
    for key, value in EVAL_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.no_eval = bool(args.no_eval)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    cfg.lora = bool(args.lora)
    cfg.eval_every = 0 if args.no_eval else args.eval_every
    return cfg


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber another run's checkpoints or a finished run."""
    if resume:
        if latest_checkpoint(out) is None:
            hint = " (it holds a finished run)" if (out / SUMMARY_FILE).exists() else ""
            raise FileNotFoundError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}{hint}; run without --resume.")
        return
    if latest_checkpoint(out) is not None:
        raise ValueError(f"{out} holds checkpoints of an unfinished run; pass --resume to continue it, or choose "
                         "another --out.")
    if (out / SUMMARY_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a fine-tuned model; pass --overwrite to replace it, or choose another --out.")


def resolve_resume_options(args: argparse.Namespace, out: Path) -> None:
    """On --resume, omitted options take the checkpoint's values; given ones must match them."""
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    saved = dict(state["trajectory"], **state.get("options", {}))
    given = {k: getattr(args, k) for k in TRAJECTORY_OPTIONS + RUN_OPTIONS if getattr(args, k, None) is not None}
    unset = {"train_dtype": "auto", "model": "default", "data": "default"}  # argparse defaults that mean 'omitted'
    clash = [f"--{k.replace('_', '-')} {v!r} (checkpoint: {saved[k]!r})" for k, v in given.items()
             if k in saved and saved[k] != v and unset.get(k) != v]
    if clash:
        raise ValueError("--resume: " + ", ".join(clash) + " differ from the checkpoint; drop them to continue the "
                         "same run, or start a new --out.")
    for k, v in saved.items():
        setattr(args, k, v)


def training_text_for(spec: str) -> str:
    from . import data

    return data.training_text() if spec in ("default", "austen-train") else data.load_text(spec)


def run(args: argparse.Namespace) -> int:
    from .plan import as_plan

    out = Path(args.out)
    prepare_output(out, args.resume, args.overwrite)
    if args.resume:
        resolve_resume_options(args, out)
    fill_defaults(args)
    cfg = config_from_args(args)
    cfg.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, train_dtype = resolve_precision(args)
    cfg.train_dtype = DTYPE_NAMES[train_dtype]
    if args.plan is not None and not as_plan(args.plan).is_identity:
        check_plan_has_parallel_groups(args.plan)  # before loading anything
    progress = not args.quiet
    texts = load_texts(args)  # before the model: a bad --data fails fast

    setup = prepare_models(args, cfg, device, dtype)
    data = TokenBatches(tokenize_text(setup.tokenizer, texts.pop("train")), cfg.seq_len, cfg.batch_size, cfg.seed)
    meta: dict[str, Any] = {"plan": str(setup.plan),
                            "options": dict({k: getattr(args, k) for k in RUN_OPTIONS}, dtype=DTYPE_NAMES[dtype])}
    measure = _measurer(setup.tokenizer, texts, args, device, dtype, progress)
    if not args.resume and measure:  # base and LP, in the evaluation dtype, before any weight changes
        digest = hashlib.sha256("\0".join(texts.get(k, "") for k in ("held_out", "other_domain")).encode()).hexdigest()
        meta["base"] = cached_perplexities(setup.base, measure, args, "base", digest) if setup.base is not None else None
        meta["lp"] = cached_perplexities(setup.student, measure, args, str(setup.plan), digest)

    model, teacher = make_trainable(setup, cfg, train_dtype)
    memory = check_memory(model, teacher.model if teacher else None, cfg, device, train_dtype)
    _report_setup(args, cfg, setup, model, data, memory, train_dtype)
    curve_eval = None
    if cfg.eval_every and measure:
        curve_eval = _measurer(setup.tokenizer, {"held_out": texts["held_out"]}, args, device, train_dtype, False)
    result = train(model, teacher, data, cfg, out, device, train_dtype, resume=args.resume, evaluate=curve_eval,
                   meta=meta, progress=progress)
    meta = result.resumed_meta  # type: ignore[attr-defined]
    if not result.finished and result.stopped_by != "max_minutes":
        return 1
    trained = {k: v.detach().float().cpu() for k, v in trainable_state(model).items()}
    del model, teacher, setup  # the final model is rebuilt from the original weights in --dtype
    final, tokenizer = final_model(args, cfg, trained, device, dtype)
    save_model(final, tokenizer, out)
    summary = summarise(args, cfg, meta["plan"], result, meta, measure(final) if measure else None, device, dtype,
                        train_dtype, data)
    write_summary(summary, out)
    if result.finished and not args.keep_checkpoints_after:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    print_summary(summary, out)
    return 0


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16): there bf16 training is ~3x faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_precision(args: argparse.Namespace) -> tuple[str, torch.dtype, torch.dtype]:
    """(device, dtype of the saved/evaluated model, dtype of the training forward/backward)."""
    from .models import as_dtype, default_device

    device = args.device or default_device()
    on_gpu = str(device).startswith("cuda")
    dtype = as_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    auto = "bf16" if on_gpu or cpu_has_fast_bf16() else "fp32"
    train_dtype = as_dtype(auto if args.train_dtype in (None, "auto") else args.train_dtype)
    if torch.float16 in (dtype, train_dtype):
        raise ValueError("fp16 is not supported for fine-tuning (it needs loss scaling); use bf16 or fp32.")
    return device, dtype, train_dtype


@dataclass
class Setup:
    student: Any  # the transformed model (trained layers still untouched)
    base: Any | None  # the model before the plan (None for an already transformed --model)
    tokenizer: Any
    plan: Any
    trained_layers: list[int]
    split: int  # leading layers student and teacher share


def prepare_models(args: argparse.Namespace, cfg: TrainConfig, device: Any, dtype: torch.dtype) -> Setup:
    """Load --model in the evaluation dtype and build the student (sharing frozen weights with the base)."""
    from .models import load
    from .plan import as_plan

    print(f"loading {args.model} ...", file=sys.stderr)
    base, tokenizer = load(args.model, dtype=dtype, device=device)
    recorded = getattr(base.config, "truedepth", None)
    if recorded is not None:
        plan = _already_transformed(args, cfg, recorded)
        trained = trainable_layer_indices(recorded["layer_widths"], cfg.neighbours)
        return Setup(base, None, tokenizer, plan, trained, 0)
    plan = as_plan(args.plan or DEFAULT_PLAN)
    check_plan_has_parallel_groups(plan)
    student = build_student(base, plan, cfg.neighbours)
    trained = trainable_layer_indices(student.config.truedepth["layer_widths"], cfg.neighbours)
    split = shared_prefix_length(plan.blocks(recorded_depth(student)), trained)
    return Setup(student, base, tokenizer, plan, trained, split)


def recorded_depth(model: Any) -> int:
    return model.config.truedepth["original_num_hidden_layers"]


def make_trainable(setup: Setup, cfg: TrainConfig, train_dtype: torch.dtype) -> tuple[Any, Teacher | None]:
    """Freeze all but the trained layers (or add LoRA adapters); fp32 master copies of what trains,
    `train_dtype` for everything frozen; the distillation teacher when needed."""
    from .transform import decoder_layers

    freeze_all_but(setup.student, setup.trained_layers)
    model = add_lora(setup.student, setup.trained_layers, cfg.lora_rank, cfg.lora_alpha) if cfg.lora else setup.student
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # master copy: AdamW updates are lost in bf16
    teacher = None
    if cfg.loss == "distill":
        teacher = Teacher(setup.base, decoder_layers(setup.student), setup.split)
    cast_frozen([model, teacher.model if teacher else None], train_dtype)
    return model, teacher


def final_model(args: argparse.Namespace, cfg: TrainConfig, trained: dict[str, torch.Tensor], device: Any,
                dtype: torch.dtype) -> tuple[Any, Any]:
    """The original weights in `dtype` with the plan applied and the trained tensors put in.

    LoRA adapters are merged here, in float32 where `dtype` is float32. Frozen weights come from
    the model file, not from the training copy, which may have been cast to a lower precision.
    """
    from .models import load

    model, tokenizer = load(args.model, dtype=dtype, device=device)
    if getattr(model.config, "truedepth", None) is None:
        from .transform import apply_plan

        apply_plan(model, args.plan or DEFAULT_PLAN)
    layers = trainable_layer_indices(model.config.truedepth["layer_widths"], cfg.neighbours)
    freeze_all_but(model, layers)
    if cfg.lora:
        model = add_lora(model, layers, cfg.lora_rank, cfg.lora_alpha)
    load_trained(model, trained)
    if cfg.lora:
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


def load_trained(model: Any, trained: dict[str, torch.Tensor]) -> None:
    params = trainable_state(model)
    if set(params) != set(trained):
        missing = sorted(set(trained) ^ set(params))[:4]
        raise RuntimeError(f"trained tensors do not match the rebuilt model (e.g. {missing}); this is a bug.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trained[name].to(p.dtype))


def save_model(model: Any, tokenizer: Any, out: Path) -> None:
    """Save with safetensors next to the tokenizer: a folder every truedepth command loads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def cached_perplexities(model: Any, measure: Callable[[Any], dict[str, float]], args: argparse.Namespace,
                        label: str, texts_digest: str) -> dict[str, float]:
    """Perplexities of the base and LP models, cached (they do not depend on training options)."""
    from .models import resolve

    key = json.dumps([label, _weights_fingerprint(resolve(args.model)), texts_digest,
                      args.eval_tokens, args.eval_window, str(next(model.parameters()).dtype),
                      str(next(model.parameters()).device.type)])
    path = _ppl_cache_path()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cache:
        cache = dict(json.loads(path.read_text()) if path.is_file() else {}, **{key: measure(model)})
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    return cache[key]


def _ppl_cache_path() -> Path:
    from .models import cache_dir

    return cache_dir() / "finetune-perplexity-cache.json"


def _weights_fingerprint(path: str) -> str:
    """Folder + size + mtime of its weight files (a hub id has none: then the id itself)."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    return json.dumps([str(Path(path).resolve()) if files else path] + [[f.name, f.stat().st_size, f.stat().st_mtime]
                                                                          for f in files])


def _already_transformed(args: argparse.Namespace, cfg: TrainConfig, recorded: dict[str, Any]) -> Any:
    from .plan import as_plan

    plan = as_plan(recorded["plan"])
    if args.plan is not None and not as_plan(args.plan).is_identity and as_plan(args.plan) != plan:
        raise ValueError(f"{args.model} was already transformed with plan '{plan}'; plans refer to the original "
                         "layers, so pass the original model with --plan, or omit --plan to keep training this one.")
    check_plan_has_parallel_groups(plan, recorded)
    if cfg.loss == "distill":
        raise ValueError(f"{args.model} is already transformed, so the model before the plan (the distillation "
                         "teacher) is not available; use --loss lm, or start from the original model with --plan.")
    return plan


def load_texts(args: argparse.Namespace) -> dict[str, str]:
    from . import data

    texts = {"train": training_text_for(args.data)}
    if not args.no_eval:
        texts["held_out"] = data.load_text(args.eval_text)
        if args.other_text.lower() != "none":
            texts["other_domain"] = data.load_text(args.other_text)
        if texts["held_out"][:10000] in texts["train"]:
            print(f"warning: the training data contains the evaluation text ({args.eval_text}); held-out perplexity "
                  "will overstate the recovery.", file=sys.stderr)
    return texts


def _measurer(tokenizer: Any, texts: dict[str, str], args: argparse.Namespace, device: Any, dtype: torch.dtype,
              progress: bool) -> Callable[[Any], dict[str, float]] | None:
    texts = {k: v for k, v in texts.items() if k in ("held_out", "other_domain")}
    if not texts or args.no_eval:
        return None
    return lambda model: perplexities(model, tokenizer, texts, args.eval_tokens, args.eval_window, device, dtype,
                                      progress)


def summarise(args: argparse.Namespace, cfg: TrainConfig, plan: Any, result: TrainResult, meta: dict[str, Any],
              final: dict[str, float] | None, device: Any, dtype: torch.dtype, train_dtype: torch.dtype,
              data: TokenBatches) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "model": str(args.model), "plan": str(plan), "data": args.data, "loss": cfg.loss, "lora": cfg.lora,
        "config": asdict(cfg), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "train_dtype": str(train_dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "steps": result.step, "tokens": result.tokens,
        "finished": result.finished, "stopped_by": result.stopped_by,
        "epochs": round(data.epochs(result.step), 3), "train_seconds": round(result.train_seconds, 1),
        "tokens_per_second": round(result.tokens / max(result.train_seconds, 1e-9), 1),
        "peak_memory_bytes": _peak_memory(device),
        "date": time.strftime("%Y-%m-%d"), "command": "truedepth " + " ".join(sys.argv[1:]),
        "history": result.history, "evals": result.evals,
    }
    if final is not None and meta.get("lp"):
        names = list(final)
        base = meta.get("base") or {}
        summary["eval_names"] = names
        summary["eval_tokens"], summary["eval_window"] = args.eval_tokens, args.eval_window
        summary["perplexity"] = {n: {"base": base.get(n), "lp": meta["lp"][n], "ft": final[n],
                                     "recovered": _recovered(base.get(n), meta["lp"][n], final[n])}
                                 for n in names}
        for e in summary["evals"]:
            e["recovered"] = _recovered(base.get("held_out"), meta["lp"]["held_out"], e["held_out"])
    return summary


def _recovered(base: float | None, lp: float, ft: float) -> float | None:
    return None if base is None else recovered_fraction(base, lp, ft)


def _peak_memory(device: Any) -> int | None:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:
        return None


def write_summary(summary: dict[str, Any], out: Path) -> None:
    tmp = out / f".{SUMMARY_FILE}.tmp"
    _write_bytes(tmp, json.dumps(summary, indent=1).encode())
    os.replace(tmp, out / SUMMARY_FILE)
    plot_curve(summary, out / CURVE_FILE)


def _report_setup(args: argparse.Namespace, cfg: TrainConfig, setup: Setup, model: Any, data: TokenBatches,
                  memory: dict[str, int], train_dtype: torch.dtype) -> None:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in unique_parameters(model))
    epochs = data.epochs(cfg.total_steps)
    depth = len(setup.student.config.truedepth["layer_widths"])
    print(f"plan {setup.plan}: training layers {setup.trained_layers} of {depth} "
          f"({'LoRA r=%d' % cfg.lora_rank if cfg.lora else 'full weights'}; {n_train / 1e6:.2f}M of "
          f"{n_all / 1e6:.1f}M parameters), loss {cfg.loss}, computing in {str(train_dtype)[6:]}", file=sys.stderr)
    print(f"data {args.data}: {data.num_sequences} sequences of {cfg.seq_len} tokens; {cfg.total_steps} steps of "
          f"{cfg.batch_size} x {cfg.seq_len} = {cfg.total_steps * cfg.tokens_per_step} tokens ({epochs:.2f} epochs); "
          f"estimated extra memory {memory['total'] / 2**30:.2f} GiB", file=sys.stderr)
    if epochs > 1:
        print(f"note: {epochs:.1f} passes over the training data; beyond one the model may memorise it.",
              file=sys.stderr)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    print(f"fine-tuned {summary['steps']} steps, {summary['tokens']} tokens in {summary['train_seconds']:.0f} s "
          f"({summary['tokens_per_second']:.0f} tok/s, {summary['device']}, {summary['dtype']})"
          + (" -- stopped by --max-minutes" if summary["stopped_by"] == "max_minutes" else ""))
    for name, p in (summary.get("perplexity") or {}).items():
        rec = "n/a" if p["recovered"] is None else f"{100 * p['recovered']:.1f}%"
        base = "n/a" if p["base"] is None else f"{p['base']:.3f}"
        print(f"  {name:13s} perplexity  base {base}   LP {p['lp']:.3f}   fine-tuned {p['ft']:.3f}   "
              f"recovered {rec}")
    print(f"saved to {out} (load with truedepth.load('{out}')); summary {out / SUMMARY_FILE}, plot {out / CURVE_FILE}")
