"""The models of a fine-tune: the student (which layers train, LoRA, frozen casts), the teacher, and memory."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ...core.arch import layer_hidden, recorded_widths
from ...core.plan import PlanError
from ...utils.errors import UserError
from .config import DEFAULT_PLAN, TrainConfig


# =============================================================================================
# Which layers train, the student and the teacher
# =============================================================================================
def wide_layer_indices(model: Any) -> list[int]:
    """Indices (in the transformed model) of the wide layers: `layer_widths[i] > 1`."""
    return [i for i, w in enumerate(recorded_widths(model.config)) if w > 1]


def wide_members(plan: Any, depth: int) -> dict[int, tuple[int, ...]]:
    """For every wide layer of the transformed model: the original layers it replaced."""
    from ...core.plan import as_plan

    return {i: b.layers for i, b in enumerate(as_plan(plan).blocks(depth)) if b.kind == "parallel"}


def trainable_layer_indices(layer_widths: list[int], neighbours: int = 0, last: int = 0) -> list[int]:
    """Wide layers plus `neighbours` ordinary layers on each side of every wide block, plus the `last` layers."""
    wide = [i for i, w in enumerate(layer_widths) if w > 1]
    chosen = set(wide) | set(range(max(0, len(layer_widths) - last), len(layer_widths)))
    for i in wide:
        chosen.update(j for j in range(i - neighbours, i + neighbours + 1) if 0 <= j < len(layer_widths))
    return sorted(chosen)


def head_parameters(model: Any) -> list[torch.nn.Parameter]:
    """What --train-last trains after the last layers: the final norm, and the LM head unless it is the input
    embedding matrix (tied: training it would move every token's input too)."""
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    return list(model.get_decoder().norm.parameters()) + ([] if tied else [head])


def check_plan_has_parallel_groups(plan: Any, recorded: dict[str, Any] | None = None) -> None:
    """Raise before any loading if there is nothing to fine-tune."""
    from ...core.plan import as_plan

    if recorded is not None:
        if any(w > 1 for w in recorded.get("layer_widths", [])):
            return
        raise PlanError(
            f"the model's recorded plan '{as_plan(recorded['plan'])}' has no parallel groups, so "
            "there are no wide layers to fine-tune; start from the original model with --plan "
            f"{DEFAULT_PLAN} (or another plan with a parallel=A:B step)."
        )
    plan = as_plan(plan)
    if not any(s.kind == "parallel" for s in plan.steps):
        raise PlanError(
            f"plan '{plan}' has no parallel groups, so there are no wide layers to fine-tune; "
            f"pass a plan with a parallel=A:B step, e.g. --plan {DEFAULT_PLAN}."
        )


def build_student(base: Any, plan: Any, neighbours: int = 0, last: int = 0) -> Any:
    """A transformed copy of `base` that shares every weight it will not train with `base`.

    `base` itself stays the original model (the distillation teacher and the 'base' perplexity).
    Only the layers the plan rewrites and the trainable neighbours are copied; all other
    parameters (embeddings, untouched layers, head) are the same tensors in both models; with `last`, the
    final norm and an untied head are the student's own as well.
    """
    from ...core.plan import as_plan, widths
    from ...core.transform import apply_plan, decoder_layers

    plan = as_plan(plan)
    layers = decoder_layers(base)
    blocks = plan.blocks(len(layers))
    trained_new = trainable_layer_indices(widths(blocks), neighbours, last)
    # never share what apply_plan rewrites (it moves fused members to meta) or what training changes
    private = {j for b in blocks if b.kind != "keep" for j in b.layers}
    private |= {j for i in trained_new for j in blocks[i].layers}
    own = {id(p) for j in private for p in layers[j].parameters()}
    if last:
        own |= {id(p) for p in head_parameters(base)}
    memo = {id(p): p for p in base.parameters() if id(p) not in own}
    student = copy.deepcopy(base, memo)
    apply_plan(student, plan)
    return student


def freeze_all_but(model: Any, layer_indices: list[int], head: bool = False) -> list[str]:
    """Freeze every parameter except those of the given decoder layers (and with `head`, the final norm and an
    untied LM head); return the trained names."""
    from ...core.arch import decoder_layers

    layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for i in layer_indices for p in layers[i].parameters()]
    for p in trained + (head_parameters(model) if head else []):
        p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def add_lora(model: Any, layer_indices: list[int], rank: int, alpha: float) -> Any:
    """Wrap `model` with peft LoRA adapters on the linear modules of the given layers only."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora needs the peft package: pip install 'truedepth[finetune]' (or peft>=0.15).") from None
    picked = "|".join(str(i) for i in layer_indices)
    # a regex is matched against full module names, so only these layers get adapters
    target = rf"model\.layers\.({picked})\.(self_attn|mlp)\.[a-z_]+_proj"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, bias="none")
    return get_peft_model(model, config)


def cast_frozen(models: list[Any], dtype: torch.dtype) -> None:
    """Cast frozen parameters to `dtype` in place (shared tensors once); trainable ones stay fp32."""
    seen: set[int] = set()
    for model in models:
        for p in model.parameters() if model is not None else ():
            if id(p) in seen or p.requires_grad or p.dtype == dtype:
                continue
            seen.add(id(p))
            p.data = p.data.to(dtype)  # keeps the Parameter object, so sharing survives


def shared_prefix_length(blocks: list[Any], trained: list[int]) -> int:
    """How many leading layers the student runs exactly as the teacher does (same, frozen, in order)."""
    n = 0
    for i, block in enumerate(blocks):
        if block.kind != "keep" or block.layers != (i,) or i in trained:
            break
        n += 1
    return n


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state among a decoder layer's captured call arguments."""
    return args[0] if args else kwargs["hidden_states"]


def run_layers(layers: Any, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """`hidden` through `layers` one after another, with the other arguments (mask, rotary embeddings)
    of a captured decoder-layer call."""
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    for layer in layers:
        hidden = layer_hidden(layer(hidden, *args[1:], **rest))
    return hidden


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
        self.blocks = None  # a BlockMatch when the loss matches wide layers to the layers they replaced
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
            # programming error: train() runs the student on the same ids first
            raise RuntimeError("Teacher: run the student on the same ids first (its hidden state is reused).")
        (args, kwargs), self._captured = self._captured, None
        inner = self.model.model
        hidden = run_layers(inner.layers[self.split :], layer_input(args, kwargs), args, kwargs)
        return self.model.lm_head(inner.norm(hidden))

    def close(self) -> None:
        if self.blocks is not None:
            self.blocks.close()
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


def estimate_training_memory(
    student: Any, teacher: Any | None, cfg: TrainConfig, act_dtype: torch.dtype = torch.float32
) -> dict[str, int]:
    """Bytes that training adds on top of the loaded weights (a deliberately generous estimate).

    optimizer: fp32 gradient + two AdamW moments per trainable parameter;
    activations: tensors autograd keeps for every layer from the first trainable one to the end
    (hidden-size vectors, MLP intermediates, eager attention scores) -- layers before it run
    without a graph; logits: fp32 vocab-sized rows per token (logits, log-softmax, gradient; twice
    for distill, whose teacher has its own).
    """
    cfg_m = student.config
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    widths = recorded_widths(cfg_m)
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


def check_memory(
    student: Any, teacher: Any | None, cfg: TrainConfig, device: Any, act_dtype: torch.dtype = torch.float32
) -> dict[str, int]:
    need = estimate_training_memory(student, teacher, cfg, act_dtype)
    free = available_memory(device)
    if need["total"] > free:
        gib = 1024**3
        raise UserError(
            f"training needs an estimated {need['total'] / gib:.1f} GiB beyond the loaded weights "
            f"(optimizer {need['optimizer'] / gib:.2f}, activations {need['activations'] / gib:.2f}, logits "
            f"{need['logits'] / gib:.2f} GiB for batches of {cfg.batch_size} x {cfg.seq_len} tokens) but only "
            f"{free / gib:.1f} GiB is free on {device}; lower --batch-size or --seq-len"
            + (", or use --lora." if not cfg.lora else ".")
        )
    return need
