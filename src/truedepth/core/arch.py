"""The layer anatomy: the one home of what a decoder layer is made of and how it widens.

A Llama-style decoder layer reads its input through two RMSNorms. The projections that read a
norm's output are stacked by rows in a wide layer (ATTN_ROWS after the input norm, MLP_ROWS after
the post-attention norm); the projections that write the residual stream are placed side by side
by columns, so one GEMM sums the members' outputs (COLUMN_SUMS). Per-head norms inside attention
(Qwen3's q_norm/k_norm) get one weight row per head. The transform, tensor parallelism, the fused
projections of the fast decode loop and the exporters all read these tables.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .plan import Plan, PlanError, as_plan

# Architectures whose decoder layer is the pre-norm Llama form (RMSNorm, attention, RMSNorm,
# gated MLP) and can therefore be fused exactly. Value: per-head norms inside attention to widen.
SUPPORTED = {
    "llama": (),
    "mistral": (),
    "qwen2": (),
    "qwen3": ("q_norm", "k_norm"),
}
ATTN_ROWS = ("q_proj", "k_proj", "v_proj")  # read the input norm: rows stacked
MLP_ROWS = ("gate_proj", "up_proj")  # read the post-attention norm: rows stacked
COLUMN_SUMS = (("self_attn", "o_proj"), ("mlp", "down_proj"))  # outputs summed: columns side by side
# (module, its row-stacked projections, the norm whose output they read)
ROW_GROUPS = (("self_attn", ATTN_ROWS, "input_layernorm"), ("mlp", MLP_ROWS, "post_attention_layernorm"))
HEAD_NORMS = {"q_norm": "q_proj", "k_norm": "k_proj"}  # per-head norm -> the projection whose heads it normalises
QKV_BIAS = {"qwen2"}  # architectures whose q/k/v projections always carry a bias (and o_proj none)
# The same anatomy as dotted module paths inside a layer: rows stacked = column-parallel in TP,
# columns side by side = row-parallel in TP.
ROW_STACKED = tuple(f"self_attn.{n}" for n in ATTN_ROWS) + tuple(f"mlp.{n}" for n in MLP_ROWS)
COLUMN_SUMMED = tuple(f"{parent}.{name}" for parent, name in COLUMN_SUMS)


class UnsupportedModelError(PlanError):
    pass


# ---------------------------------------------------------------------------------------------
# Model introspection
# ---------------------------------------------------------------------------------------------
def base_model_type(config: Any) -> str:
    """The architecture name, also for a model that truedepth already registered under its own name."""
    return getattr(config, "truedepth_base_model_type", None) or config.model_type


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `model.layers` list of decoder layers; truedepth supports "
            f"causal LMs of the architectures {', '.join(sorted(SUPPORTED))}.")
    return layers


def layer_hidden(output: Any) -> Any:
    """The hidden state a decoder layer returned: transformers 5 returns the tensor, 4.x a tuple."""
    return output[0] if isinstance(output, tuple) else output


def check_supported(model: nn.Module) -> str:
    config = model.config
    arch = base_model_type(config)
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            f"model type {arch!r} is not supported; truedepth can transform {', '.join(sorted(SUPPORTED))} "
            "(pre-norm RMSNorm decoder layers with a gated MLP). Other architectures need their own fused form.")
    decoder_layers(model)
    return arch


def transformed_record(config: Any) -> dict[str, Any] | None:
    """What a transform recorded in `config.truedepth` (plan, original depth, layer widths); None
    for an original model. The one "is this model already transformed?" check."""
    return getattr(config, "truedepth", None) or None


def current_plan(config: Any) -> Plan | None:
    info = transformed_record(config)
    return as_plan(info["plan"]) if info else None


def require_original(config: Any, why: str = "plans refer to the original layers, so load the original model "
                                              "and apply one combined plan", error: type = PlanError) -> None:
    """Raise `error` if `config` belongs to a model transformed with a real (non-identity) plan."""
    previous = current_plan(config)
    if previous is not None and not previous.is_identity:
        raise error(f"this model was already transformed with plan '{previous}'; {why}.")


def wide_config(config: Any, group: int) -> Any:
    """A copy of `config` for one layer holding `group` layers' heads and MLP neurons."""
    wide = copy.copy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    wide.head_dim = head_dim  # otherwise derived from hidden_size / heads and would shrink
    wide.num_attention_heads = config.num_attention_heads * group
    wide.num_key_value_heads = (config.num_key_value_heads or config.num_attention_heads) * group
    wide.intermediate_size = config.intermediate_size * group
    return wide


def new_layer(model: nn.Module, config: Any, layer_idx: int, group: int, device: Any = "meta") -> nn.Module:
    """An empty decoder layer of the model's own class, `group` layers wide.

    `device=None` builds in the current default device (meta inside `from_pretrained`)."""
    cls = type(decoder_layers(model)[0])
    cfg = wide_config(config, group) if group > 1 else config
    if device is None:
        layer = cls(cfg, layer_idx)
    else:
        with torch.device(device):
            layer = cls(cfg, layer_idx)
    if group > 1:
        widen_head_norms(layer, base_model_type(config), cfg)
        # The widened copy was only needed for the shapes. Forward passes read the attention
        # backend from `module.config`: point every submodule back at the model's own config, so
        # a later change of `_attn_implementation` reaches the wide layers too.
        for module in layer.modules():
            if getattr(module, "config", None) is cfg:
                module.config = config
    return layer


def widen_head_norms(layer: nn.Module, arch: str, wide_cfg: Any) -> None:
    """Per-head q/k norms (Qwen3) get one weight row per head, so each member keeps its own weight."""
    heads = {"q_norm": wide_cfg.num_attention_heads, "k_norm": wide_cfg.num_key_value_heads}
    for name in SUPPORTED[arch]:
        norm = getattr(layer.self_attn, name)
        w = norm.weight
        # the norm sees (batch, seq, heads, head_dim): a (heads, head_dim) weight broadcasts per head
        norm.weight = nn.Parameter(torch.ones(heads[name], w.shape[-1], dtype=w.dtype, device=w.device))
