"""Apply a plan to a Hugging Face causal LM in place: the Layer Parallelism transform.

A parallel group G with input x computes (method.md)

    h   = x + sum_{i in G} Attn_i(Norm^in_i(x))
    out = h + sum_{i in G} MLP_i(Norm^post_i(h))

and is run as ONE wide decoder layer of the architecture's own class: RMSNorm(x)*g = x_hat*g, and
the norm weight g is folded into the columns of the projections that read it, so the members can
share one normalisation. q/k/v and gate/up rows are stacked, o_proj and down_proj placed side by
side so one GEMM sums the members' outputs. Each member keeps its own heads, KV heads and cache.

The transform is atomic and never holds a second copy of the model. It has two phases:

- staging, group by group: the members' q/k/v and gate/up rows are stacked (o/down columns placed
  side by side) into the wide layer's tensors, and each member's parameter becomes a view of its
  slice, so the old layers still compute exactly what they did and no weight is held twice (one
  projection is briefly held twice while it is copied). Merged groups share the first member's
  tensors. An error or Ctrl-C here is rolled back group by group (each staged view becomes an own
  tensor again) and leaves the model as it was: same Parameter objects, values, devices, config.
- commit, once every group is staged: only in-place arithmetic on tensors that already exist
  (norm weights folded into their rows, merged weights averaged), then the new layer list and
  config are swapped in.

Everything that can be checked is checked before staging, so a bad plan changes nothing at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import (
    COLUMN_SUMS,
    HEAD_NORMS,
    ROW_GROUPS,
    SUPPORTED,
    UnsupportedModelError,  # noqa: F401
    base_model_type,
    check_supported,
    decoder_layers,
    new_layer,
    original_depth,
    require_original,
    stack_as_views,
    transformed_record,
)
from .hf import adopt, check_adoptable
from .plan import Block, Plan, PlanError, as_plan, widths


# ---------------------------------------------------------------------------------------------
# Checks done before anything changes
# ---------------------------------------------------------------------------------------------
def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))


def check_plan_fits(model: nn.Module, plan: Plan) -> list[Block]:
    check_supported(model)
    require_original(model.config)
    check_adoptable(model)
    layers = decoder_layers(model)
    plan.validate(len(layers))
    blocks = plan.blocks(len(layers))
    layer_types = getattr(model.config, "layer_types", None)
    for block in blocks:
        if len(block.layers) < 2:
            continue
        step = _step_of(plan, block.layers[0])
        members = [layers[i] for i in block.layers]
        eps = {_norm_eps(m.input_layernorm) for m in members} | {_norm_eps(m.post_attention_layernorm) for m in members}
        if block.kind == "parallel" and len(eps) > 1:
            raise PlanError(
                f"step '{step}': layers {list(block.layers)} use different norm eps {sorted(eps)}, so "
                "they cannot share one normalisation; group only layers with equal eps."
            )
        if layer_types is not None and len({layer_types[i] for i in block.layers}) > 1:
            raise PlanError(
                f"step '{step}': layers {list(block.layers)} mix attention types "
                f"{[layer_types[i] for i in block.layers]}; group only layers of one type."
            )
    return blocks


def _step_of(plan: Plan, layer: int) -> Any:
    return next((s for s in plan.steps if layer in s.layers), None)


# ---------------------------------------------------------------------------------------------
# Weight fusion
# ---------------------------------------------------------------------------------------------
def _folded(linear: nn.Linear, gamma: torch.Tensor) -> torch.Tensor:
    # float32 product then cast back: in bf16 the fold alone costs ~1e-2 relative error (notes)
    return (linear.weight.float() * gamma.float()[None, :]).to(linear.weight.dtype)


def fused_state(members: list[nn.Module], arch: str, staged: list | None = None) -> dict[str, torch.Tensor]:
    """Staged state dict of the wide layer equivalent to running `members` in parallel.

    Stacked rows and side-by-side columns share memory with the members, whose parameters become
    views of their slices (values unchanged); each change is recorded in `staged` for `_unstage`.
    The norm weights are not folded in yet: that is `fold_norms`, at commit time."""
    out: dict[str, torch.Tensor] = {}
    for parent, names, _norm in ROW_GROUPS:  # the norm is folded in at commit time (fold_norms)
        for name in names:
            lins = [getattr(getattr(m, parent), name) for m in members]
            out[f"{parent}.{name}.weight"] = stack_as_views([lin.weight for lin in lins], 0, staged)
            if lins[0].bias is not None:
                out[f"{parent}.{name}.bias"] = stack_as_views([lin.bias for lin in lins], 0, staged)
    for parent, name in COLUMN_SUMS:
        lins = [getattr(getattr(m, parent), name) for m in members]
        out[f"{parent}.{name}.weight"] = stack_as_views([lin.weight for lin in lins], 1, staged)
        if lins[0].bias is not None:
            out[f"{parent}.{name}.bias"] = torch.stack([lin.bias.detach() for lin in lins]).sum(0)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{norm}.weight"] = torch.ones_like(getattr(members[0], norm).weight.detach())
    for name in SUPPORTED[arch]:  # per-head norms: each member's weight repeated over its heads
        proj = HEAD_NORMS[name]
        rows = []
        for m in members:
            w = getattr(m.self_attn, name).weight.detach()
            n_heads = getattr(m.self_attn, proj).out_features // w.shape[-1]
            rows.append(w.reshape(-1, w.shape[-1]).expand(n_heads, -1))
        out[f"self_attn.{name}.weight"] = torch.cat(rows, 0)
    return out


def _unstage(staged: list) -> None:
    """Roll back `fused_state`: every parameter made a view of a wide tensor gets its own contiguous
    copy again, last staged first, so each wide tensor is freed as soon as its slices are copied."""
    while staged:
        p, original = staged.pop()
        p.data = original if original is not None else p.detach().clone(memory_format=torch.contiguous_format)


def fold_norms(members: list[nn.Module]) -> None:
    """Commit a staged parallel group: multiply each member's slice of the stacked q/k/v and
    gate/up rows by the weight of the norm that reads it, in place."""
    for parent, names, norm in ROW_GROUPS:
        for m in members:
            gamma = getattr(m, norm).weight
            for name in names:
                lin = getattr(getattr(m, parent), name)
                lin.weight.data.copy_(_folded(lin, gamma))


def averaged_state(members: list[nn.Module], into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict of one layer whose every weight is the mean of the members' weights.

    With `into` (a staged merge layer's state, sharing the first member's tensors) the means are
    written into those tensors in place: no new layer-sized memory."""
    states = [m.state_dict() for m in members]
    means = {}
    for k in states[0]:
        mean = torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
        means[k] = into[k].copy_(mean) if into is not None else mean
    return means


def _build(
    model: nn.Module, block: Block, new_idx: int, old: nn.ModuleList, arch: str, config: Any, staged: list | None = None
) -> nn.Module:
    """Stage the layer at `new_idx` of the transformed model (see the module docstring); every
    parameter of the old layers it changes is recorded in `staged`."""
    members = [old[i] for i in block.layers]
    if block.kind == "keep":
        return members[0]
    layer = new_layer(model, config, new_idx, len(members) if block.kind == "parallel" else 1)
    if block.kind == "parallel":
        state = fused_state(members, arch, staged)
    else:  # merge: the first member's tensors, averaged at commit
        state = {k: v.detach() for k, v in members[0].state_dict().items()}
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.train(members[0].training)


def _commit(block: Block, layer: nn.Module, old: nn.ModuleList) -> None:
    members = [old[i] for i in block.layers]
    if block.kind == "parallel":
        fold_norms(members)
    elif block.kind == "merge":
        averaged_state(members, into=layer.state_dict())
    if block.kind != "keep":
        for m in members:  # release what only the old layers hold (their norms, merged members)
            m.to("meta")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def apply_plan(model: nn.Module, plan: Any) -> nn.Module:
    """Restructure `model` in place according to `plan` and return it.

    `plan` is a Plan, a plan string such as ``"parallel=14:24"``, or its JSON/dict form.
    `model.config.truedepth` records the plan and the original depth; the model saves and reloads
    with `save_pretrained` / `truedepth.load` (or `AutoModelForCausalLM` after `import truedepth`).
    """
    plan = as_plan(plan)
    if plan.is_identity:  # "base": nothing to do, also for a model that was transformed before
        if plan.steps:  # but "keep=..." steps must still fit the original layers
            transformed = transformed_record(model.config) is not None
            plan.validate(original_depth(model.config) if transformed else len(decoder_layers(model)))
        return model
    blocks = check_plan_fits(model, plan)
    arch = base_model_type(model.config)
    old = decoder_layers(model)
    depth_before = len(old)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    new: list[nn.Module] = []
    staged: list = []
    try:
        if layer_types is not None:
            # set first: attention reads its layer type from config at construction time
            config.layer_types = [layer_types[b.layers[0]] for b in blocks]
        for idx, block in enumerate(blocks):
            new.append(_build(model, block, idx, old, arch, config, staged))
    except BaseException:  # also Ctrl-C: nothing has been committed yet
        new.clear()  # the staged layers hold the wide tensors: let them go before copying back
        _unstage(staged)
        if layer_types is not None:
            config.layer_types = layer_types
        raise
    for block, layer in zip(blocks, new):
        _commit(block, layer, old)
    for idx, layer in enumerate(new):
        layer.self_attn.layer_idx = idx  # cache slots are indexed by layer_idx
    model.model.layers = nn.ModuleList(new)
    config.num_hidden_layers = len(new)
    config.truedepth = {
        "plan": plan.to_dict(),
        "original_num_hidden_layers": depth_before,
        "layer_widths": widths(blocks),
    }

    adopt(model)
    return model


def parallelize(model: nn.Module, start: int, end: int, group_size: int = 2) -> nn.Module:
    """Run layers start..end-1 in consecutive groups of `group_size` in parallel (shortcut for apply_plan)."""
    return apply_plan(model, Plan.parallel(start, end, group_size))
