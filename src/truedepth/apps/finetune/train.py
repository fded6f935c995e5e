"""Training the wide layers of an LP model: token batches, losses, the loop with resumable checkpoints."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...utils.device import autocast
from ...utils.errors import InputPathError, UserError
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .config import CHECKPOINT_DIR, TEACHER_LOSSES, TrainConfig
from .model import Teacher


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
            raise UserError(
                f"the training data has {ids.numel()} tokens, shorter than one sequence of "
                f"--seq-len {seq_len}; use a longer text or a smaller --seq-len."
            )
        if self.num_sequences < batch_size:
            raise UserError(
                f"the training data holds only {self.num_sequences} sequence(s) of {seq_len} tokens, "
                f"fewer than one batch of --batch-size {batch_size}; use a longer text or lower "
                "--batch-size / --seq-len."
            )
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


CHUNK_CHARS = 1 << 20
LINE_BREAK = re.compile(r"(?<=\S)\n(?=\S)")  # one newline between two non-space characters


def tokenize_text(tokenizer: Any, text: str, chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """Token ids of the whole text, no special tokens (long inputs are fine: no model limit here).

    Tokenised in pieces of about `chunk_chars` characters: a fast tokenizer's working memory for one
    string is about 140 bytes per character (measured: 0.9 GB for the 6 M characters of the default
    training text, 3.3 GB for 24 M), in pieces 0.2 GB for 24 M characters. Pieces end after a single
    newline between two non-space characters, which byte-level BPE pre-tokenisers (GPT-2,
    Llama 3, SmolLM) split off the same way at the end of an input as inside it, so the ids equal
    those of the whole text. (Not after a blank line: "\n\n" ending an input is one pre-token, inside
    it two.) With other tokenizers (SentencePiece prepends a space marker to every input) the ids may
    differ next to the cuts, one cut per `chunk_chars` characters: harmless for training.
    """
    pieces = [
        torch.tensor(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
        for piece in text_pieces(text, chunk_chars)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def text_pieces(text: str, chunk_chars: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        cut = LINE_BREAK.search(text, start + chunk_chars) if len(text) - start > chunk_chars else None
        end = cut.end() if cut else len(text)
        yield text[start:end]
        start = end


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


def compute_loss(
    student: Any, teacher: Teacher | None, ids: torch.Tensor, loss: str, block_weight: float = 0.0
) -> torch.Tensor:
    if loss == "blocks":
        teacher.blocks.run_student(student, ids)  # stops after the last wide layer
        return teacher.blocks.loss()
    logits = student(input_ids=ids, use_cache=False).logits
    if loss == "lm":
        return lm_loss(logits, ids)
    with torch.no_grad():
        target = teacher(ids)  # after the student: it may start from the student's hidden state
    kl = distill_loss(logits, target)
    return kl + block_weight * teacher.blocks.loss() if block_weight else kl


# =============================================================================================
# The training loop
# =============================================================================================
def lr_factor(step: int, cfg: TrainConfig, start: int = 0, end: int | None = None) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` at the last step; with `start`/`end`, the same
    schedule over steps start..end-1 and 0 outside them (a stage of a two-stage run)."""
    if end is not None and not start <= step < end:
        return 0.0
    end = cfg.total_steps if end is None else end
    step, total = step - start, end - start
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: dict[str, torch.Tensor], cfg: TrainConfig) -> tuple[Any, Any]:
    """AdamW and its schedule. With --calibrate, two parameter groups: the calibration vectors at
    --calibrate-lr for the first `cfg.calibrate_steps` steps, then the weights at --lr for the rest, each with
    its own warm-up and cosine decay (a group outside its stage is at learning rate 0, see `_train_step`)."""
    from .calibrate import is_calibration

    adamw = dict(weight_decay=cfg.weight_decay, betas=(0.9, 0.95), foreach=False)
    if cfg.calibrate == "none":
        optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, **adamw)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    calibration = [p for n, p in params.items() if is_calibration(n)]
    weights = [p for n, p in params.items() if not is_calibration(n)]
    split = cfg.calibrate_steps
    groups = [{"params": calibration, "lr": cfg.calibrate_lr}]
    schedules = [lambda s: lr_factor(s, cfg, 0, split)]
    if weights:
        groups.append({"params": weights, "lr": cfg.lr})
        schedules.append(lambda s: lr_factor(s, cfg, split, cfg.total_steps))
    optimizer = torch.optim.AdamW(groups, **adamw)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


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


def train(
    student: Any,
    teacher: Teacher | None,
    data: TokenBatches,
    cfg: TrainConfig,
    out: Path | None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    resume: bool = False,
    stop_after: int | None = None,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the student's trainable parameters with AdamW; checkpoint to `out`/checkpoints.

    `resume` restores the latest checkpoint in `out` (weights, optimizer, scheduler, RNG, step).
    `stop_after` stops after that many steps in total (used to simulate an interruption).
    `evaluate(model)` runs every `cfg.eval_every` steps and at the end; its dict is recorded.
    `meta` (JSON-able) is stored in checkpoints and returned in `resumed_meta` on resume.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.loss in TEACHER_LOSSES and teacher is None:
        raise UserError(f"--loss {cfg.loss} needs the teacher (the model before the plan).")
    params = trainable_state(student)
    if not params:
        raise UserError("the model has no trainable parameters; is there a parallel group in the plan?")
    optimizer, scheduler = make_optimizer(params, cfg)
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
    bar = tqdm(
        total=total,
        initial=result.step,
        desc=f"finetune ({cfg.loss})",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        while result.step < total:
            if stop_after is not None and result.step >= stop_after:
                result.stopped_by = "stop_after"
                break
            if cfg.max_minutes is not None and result.train_seconds >= cfg.max_minutes * 60:
                result.stopped_by = "max_minutes"
                break
            loss = _train_step(
                student, teacher, data.batch(result.step).to(device), cfg, optimizer, scheduler, params, device, dtype
            )
            result.step += 1
            result.tokens = result.step * cfg.tokens_per_step
            result.train_seconds = base_seconds + time.perf_counter() - started
            result.history.append(
                {
                    "step": result.step,
                    "tokens": result.tokens,
                    "loss": loss,
                    "lr": max(scheduler.get_last_lr()),  # of the group in its stage (--calibrate)
                    "seconds": round(result.train_seconds, 3),
                }
            )
            bar.update(1)
            bar.set_postfix(
                loss=f"{_smoothed(result.history):.4f}", tok_s=f"{result.tokens / max(result.train_seconds, 1e-9):.0f}"
            )
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


def _train_step(
    student: Any,
    teacher: Teacher | None,
    ids: torch.Tensor,
    cfg: TrainConfig,
    optimizer: Any,
    scheduler: Any,
    params: dict[str, torch.Tensor],
    device: Any,
    dtype: torch.dtype,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        loss = compute_loss(student, teacher, ids, cfg.loss, cfg.block_weight)
    loss.backward()
    for group in optimizer.param_groups:
        if group["lr"] == 0:  # outside its stage (--calibrate): no clipping share, no update, moments untouched
            for p in group["params"]:
                p.grad = None
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip, foreach=False)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def time_training_step(
    student: Any,
    teacher: Teacher | None,
    ids: torch.Tensor,
    cfg: TrainConfig,
    device: Any,
    dtype: torch.dtype,
    repeats: int = 3,
) -> float:
    """Seconds of one training step's forward, teacher and backward passes, the mean of `repeats` after a
    warm-up. The weights are left as they were (gradients are dropped, no update); the AdamW update
    itself is small next to the passes and is covered by the caller's margin."""
    params = trainable_state(student)
    student.train()
    timed = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = compute_loss(student, teacher, ids, cfg.loss, cfg.block_weight)
        loss.backward()
        if i:
            timed.append(time.perf_counter() - start)
        for p in params.values():
            p.grad = None
    return sum(timed) / len(timed)


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


def _checkpoint(
    out: Path,
    result: TrainResult,
    params: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    cfg: TrainConfig,
    data: TokenBatches,
    meta: dict[str, Any],
) -> None:
    info = dict(
        meta,
        config=asdict(cfg),
        trajectory=cfg.trajectory(),
        data_digest=data.digest,
        data_sequences=data.num_sequences,
        tokens=result.tokens,
        train_seconds=result.train_seconds,
        history=result.history,
        evals=result.evals,
    )
    save_checkpoint(out, result.step, params, optimizer, scheduler, info, keep=cfg.keep_checkpoints)


def _restore(
    out: Path | None,
    params: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    cfg: TrainConfig,
    data: TokenBatches,
    meta: dict[str, Any],
) -> TrainResult:
    path = latest_checkpoint(out) if out is not None else None
    if path is None:
        raise InputPathError(
            f"--resume: no checkpoint in {Path(out or '.') / CHECKPOINT_DIR}; run without --resume to start training."
        )
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
    return TrainResult(
        step=state["step"],
        tokens=state["tokens"],
        finished=False,
        train_seconds=state["train_seconds"],
        history=state["history"],
        evals=state["evals"],
    )


def check_resumable(state: dict[str, Any], cfg: TrainConfig, data: TokenBatches, names: set[str]) -> None:
    """The checkpoint must come from the same trajectory: same options, data and parameters."""
    saved = state["trajectory"]
    defaults = TrainConfig().trajectory()  # options added later are missing from older checkpoints
    diff = [
        f"--{k.replace('_', '-')} {saved.get(k, defaults[k])!r} (now {v!r})"
        for k, v in cfg.trajectory().items()
        if saved.get(k, defaults[k]) != v
    ]
    if diff:
        raise UserError(
            "--resume: the checkpoint was trained with " + ", ".join(diff) + "; pass the same "
            "options as the first run (or start a new --out)."
        )
    if state["data_digest"] != data.digest:
        raise UserError(
            "--resume: the training data differs from the data of the checkpoint; pass the same "
            "--data (and --model, whose tokenizer cuts it) as the first run."
        )
    if set(state["trainable"]) != names:
        raise UserError(
            "--resume: the checkpoint's trainable parameters do not match this model; pass the same "
            "--model and --plan as the first run."
        )
