"""Apply a plan to a Hugging Face causal LM in place: the Layer Parallelism transform.

A parallel group G with input x computes (method.md)

    h   = x + sum_{i in G} Attn_i(Norm^in_i(x))
    out = h + sum_{i in G} MLP_i(Norm^post_i(h))

and is run as ONE wide decoder layer of the architecture's own class: RMSNorm(x)*g = x_hat*g, and
the norm weight g is folded into the columns of the projections that read it, so the members can
share one normalisation. q/k/v and gate/up rows are stacked, o_proj and down_proj placed side by
side so one GEMM sums the members' outputs. Each member keeps its own heads, KV heads and cache.

The transform works group by group: a group's wide layer is built, then the group's old weights
are released, so memory never holds more than one extra group. Everything that can be checked is
checked before the first weight changes, so a bad plan leaves the model untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import (ATTN_ROWS, COLUMN_SUMS, HEAD_NORMS, MLP_ROWS, ROW_GROUPS, SUPPORTED, UnsupportedModelError,  # noqa: F401
                   base_model_type, check_supported, current_plan, decoder_layers, new_layer, require_original)
from .plan import Block, Plan, PlanError, as_plan, widths

# ---------------------------------------------------------------------------------------------
# Checks done before anything changes
# ---------------------------------------------------------------------------------------------
def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))


def check_plan_fits(model: nn.Module, plan: Plan) -> list[Block]:
    arch = check_supported(model)
    require_original(model.config)
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
            raise PlanError(f"step '{step}': layers {list(block.layers)} use different norm eps {sorted(eps)}, so "
                            "they cannot share one normalisation; group only layers with equal eps.")
        if layer_types is not None and len({layer_types[i] for i in block.layers}) > 1:
            raise PlanError(f"step '{step}': layers {list(block.layers)} mix attention types "
                            f"{[layer_types[i] for i in block.layers]}; group only layers of one type.")
    return blocks


def _step_of(plan: Plan, layer: int) -> Any:
    return next((s for s in plan.steps if layer in s.layers), None)


# ---------------------------------------------------------------------------------------------
# Weight fusion
# ---------------------------------------------------------------------------------------------
def _folded(linear: nn.Linear, gamma: torch.Tensor) -> torch.Tensor:
    # float32 product then cast back: in bf16 the fold alone costs ~1e-2 relative error (notes)
    return (linear.weight.float() * gamma.float()[None, :]).to(linear.weight.dtype)


def fused_state(members: list[nn.Module], arch: str) -> dict[str, torch.Tensor]:
    """State dict of the wide layer equivalent to running `members` in parallel."""
    out: dict[str, torch.Tensor] = {}
    for parent, names, norm in ROW_GROUPS:
        for name in names:
            lins = [getattr(getattr(m, parent), name) for m in members]
            out[f"{parent}.{name}.weight"] = torch.cat(
                [_folded(lin, getattr(m, norm).weight) for lin, m in zip(lins, members)], 0)
            if lins[0].bias is not None:
                out[f"{parent}.{name}.bias"] = torch.cat([lin.bias for lin in lins], 0)
    for parent, name in COLUMN_SUMS:
        lins = [getattr(getattr(m, parent), name) for m in members]
        out[f"{parent}.{name}.weight"] = torch.cat([lin.weight for lin in lins], 1)
        if lins[0].bias is not None:
            out[f"{parent}.{name}.bias"] = torch.stack([lin.bias for lin in lins]).sum(0)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{norm}.weight"] = torch.ones_like(getattr(members[0], norm).weight)
    for name in SUPPORTED[arch]:  # per-head norms: each member's weight repeated over its heads
        proj = HEAD_NORMS[name]
        rows = []
        for m in members:
            w = getattr(m.self_attn, name).weight
            n_heads = getattr(m.self_attn, proj).out_features // w.shape[-1]
            rows.append(w.reshape(-1, w.shape[-1]).expand(n_heads, -1))
        out[f"self_attn.{name}.weight"] = torch.cat(rows, 0)
    return out


def averaged_state(members: list[nn.Module]) -> dict[str, torch.Tensor]:
    """State dict of one layer whose every weight is the mean of the members' weights."""
    states = [m.state_dict() for m in members]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}


def _build(model: nn.Module, block: Block, new_idx: int, old: nn.ModuleList, arch: str, config: Any) -> nn.Module:
    members = [old[i] for i in block.layers]
    if block.kind == "keep":
        return members[0]
    if block.kind == "parallel":
        state = fused_state(members, arch)
        layer = new_layer(model, config, new_idx, len(members))
    else:  # merge
        state = averaged_state(members)
        layer = new_layer(model, config, new_idx, 1)
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.train(members[0].training)


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
        return model
    blocks = check_plan_fits(model, plan)
    arch = base_model_type(model.config)
    old = decoder_layers(model)
    original_depth = len(old)
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        # computed first: attention reads its layer type from config at construction time
        config.layer_types = [config.layer_types[b.layers[0]] for b in blocks]
    new: list[nn.Module] = []
    for idx, block in enumerate(blocks):
        new.append(_build(model, block, idx, old, arch, config))
        if block.kind != "keep":
            for i in block.layers:  # release the group's old weights now, not at the end
                old[i].to("meta")
    for idx, layer in enumerate(new):
        layer.self_attn.layer_idx = idx  # cache slots are indexed by layer_idx
    model.model.layers = nn.ModuleList(new)
    config.num_hidden_layers = len(new)
    config.truedepth = {"plan": plan.to_dict(), "original_num_hidden_layers": original_depth,
                        "layer_widths": widths(blocks)}
    from .hf import adopt  # the registered subclass makes save_pretrained/from_pretrained round-trip

    adopt(model)
    return model


def parallelize(model: nn.Module, start: int, end: int, group_size: int = 2) -> nn.Module:
    """Run layers start..end-1 in consecutive groups of `group_size` in parallel (shortcut for apply_plan)."""
    return apply_plan(model, Plan.parallel(start, end, group_size))
