"""The layer anatomy: the one home of what a decoder layer is made of and how it widens.

A Llama-style decoder layer reads its input through two RMSNorms. The projections that read a
norm's output are stacked by rows in a wide layer (ATTN_ROWS after the input norm, MLP_ROWS after
the post-attention norm); the projections that write the residual stream are placed side by side
by columns, so one GEMM sums the members' outputs (COLUMN_SUMS). Per-head norms inside attention
(Qwen3's q_norm/k_norm) get one weight row per head. The transform, tensor parallelism, the fused
projections of the fast decode loop and the exporters all read these tables.

`layer_widths(config, plan)` gives every layer's heads, KV heads, head size and MLP size from a
config (TP, vLLM, GGUF and compress read it), and the `truedepth` record a transform leaves in the
config is read only through the accessors here (`transformed_record`, `current_plan`,
`recorded_widths`, `original_depth`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..utils.errors import UserError
from .plan import Block, Plan, PlanError, as_plan, widths

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
            f"causal LMs of the architectures {', '.join(sorted(SUPPORTED))}."
        )
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
            "(pre-norm RMSNorm decoder layers with a gated MLP). Other architectures need their own fused form."
        )
    decoder_layers(model)
    return arch


# ---------------------------------------------------------------------------------------------
# The `truedepth` config record: read only through these accessors (tests/test_architecture.py)
# ---------------------------------------------------------------------------------------------
def _field(config: Any, name: str, default: Any = None) -> Any:
    """A field of a transformers config, or of a config.json dict (vLLM's checks read the file)."""
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def transformed_record(config: Any) -> dict[str, Any] | None:
    """What a transform recorded in `config.truedepth` (plan, original depth, layer widths); None
    for an original model. The one "is this model already transformed?" check. `config` is a
    transformers config or a config.json dict."""
    return _field(config, "truedepth") or None


def current_plan(config: Any) -> Plan | None:
    """The plan a transformed model was made with; None for an original model."""
    info = transformed_record(config)
    return as_plan(info["plan"]) if info and "plan" in info else None


def recorded_widths(config: Any) -> list[int]:
    """How many original layers each layer holds side by side (1 for an ordinary layer), as the
    transform recorded it and the model classes build it; all 1 for an original model."""
    info = transformed_record(config)
    if info and info.get("layer_widths") is not None:
        return [int(w) for w in info["layer_widths"]]
    return [1] * int(_field(config, "num_hidden_layers"))


def original_depth(config: Any) -> int:
    """The number of layers of the model before its plan (its own depth for an original model)."""
    info = transformed_record(config)
    if info and "original_num_hidden_layers" in info:
        return int(info["original_num_hidden_layers"])
    return int(_field(config, "num_hidden_layers"))


def require_original(
    config: Any,
    why: str = "plans refer to the original layers, so load the original model and apply one combined plan",
    error: type = PlanError,
) -> None:
    """Raise `error` if `config` belongs to a model transformed with a real (non-identity) plan."""
    previous = current_plan(config)
    if previous is not None and not previous.is_identity:
        raise error(f"this model was already transformed with plan '{previous}'; {why}.")


# ---------------------------------------------------------------------------------------------
# Per-layer widths: the one computation (TP, vLLM, GGUF and compress read it)
# ---------------------------------------------------------------------------------------------
def head_dim(config: Any) -> int | None:
    """The size of one attention head: explicit (Qwen3, Llama 3.2) or hidden size / heads; None
    for a config.json fragment that names neither `head_dim` nor `hidden_size`."""
    explicit = _field(config, "head_dim")
    if explicit:
        return int(explicit)
    hidden = _field(config, "hidden_size")
    return int(hidden) // int(_field(config, "num_attention_heads")) if hidden else None


@dataclass(frozen=True)
class LayerWidths:
    """The widths of one decoder layer of a (transformed) model.

    A wide layer of `width` members runs one layer of the architecture's own class with the
    members' q/k/v and gate/up rows stacked (ATTN_ROWS, MLP_ROWS) and o/down columns side by side
    (COLUMN_SUMS): `width` times the heads, KV heads and MLP neurons of one original layer, at the
    same head size. A merged or kept layer has the original widths."""

    index: int  # position in the (transformed) model
    kind: str  # keep | parallel | merge
    originals: tuple[int, ...]  # the original layers it is made from; () when the record names no plan
    width: int  # original layers side by side (1 unless kind is parallel)
    heads: int  # attention (query) heads
    kv_heads: int
    head_dim: int | None  # None only for a config.json fragment without head_dim and hidden_size
    intermediate: int  # MLP neurons (gate/up rows, down columns)

    def describe(self) -> str:
        """'layer 3 (original layer 6)', 'layer 0 (wide: original layers 0, 1 in parallel)', ..."""
        members = ", ".join(map(str, self.originals))
        if self.kind == "parallel":
            what = f"original layers {members}" if self.originals else f"{self.width} original layers"
            return f"layer {self.index} (wide: {what} in parallel)"
        if self.kind == "merge":
            return f"layer {self.index} (merge of original layers {members})"
        moved = self.originals and self.originals != (self.index,)
        return f"layer {self.index}" + (f" (original layer {self.originals[0]})" if moved else "")

    def sizes(self) -> dict[str, int]:
        """The widths a tensor-parallel split must divide, by name."""
        return {"attention heads": self.heads, "KV heads": self.kv_heads, "MLP intermediate size": self.intermediate}

    def matrix_weights(self, hidden_size: int) -> int:
        """Weights of the matrices one token passes through in this layer: q and o (heads), k and v
        (KV heads), gate, up and down (MLP neurons)."""
        if self.head_dim is None:
            raise UserError("the config names neither head_dim nor hidden_size: the head size is unknown.")
        attention = 2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
        return hidden_size * (attention + 3 * self.intermediate)


def layer_widths(config: Any, plan: Any = None) -> list[LayerWidths]:
    """Every decoder layer's widths, from the config alone (no model is built).

    `config` is a transformers config or a config.json dict. For an original model, the layers
    after `plan` (None: the model as it is); a transformed model's config records its plan and
    widths, and a further non-identity `plan` is refused (plans refer to the original layers)."""
    if transformed_record(config) is not None:
        if plan is not None and not as_plan(plan).is_identity:
            raise PlanError(
                f"this model was already transformed with plan '{current_plan(config)}'; plans refer "
                "to the original layers, so load the original model and apply one combined plan."
            )
        sizes = recorded_widths(config)
        previous = current_plan(config)
        blocks = previous.blocks(original_depth(config)) if previous is not None else None
        if blocks is None or widths(blocks) != sizes:  # no plan recorded: the widths alone
            blocks = [Block("parallel" if w > 1 else "keep", ()) for w in sizes]
    else:
        n = int(_field(config, "num_hidden_layers"))
        blocks = as_plan(plan).blocks(n) if plan is not None else [Block("keep", (i,)) for i in range(n)]
        sizes = widths(blocks)
    heads = int(_field(config, "num_attention_heads"))
    kv_heads = int(_field(config, "num_key_value_heads") or heads)
    mlp = int(_field(config, "intermediate_size"))
    size = head_dim(config)
    return [
        LayerWidths(i, b.kind, tuple(b.layers), w, heads * w, kv_heads * w, size, mlp * w)
        for i, (b, w) in enumerate(zip(blocks, sizes, strict=True))
    ]


def measured_widths(model: nn.Module) -> list[LayerWidths]:
    """Every decoder layer's widths read from its projections (what a loaded model really holds),
    with kind and original layers from its config."""
    planned = layer_widths(model.config)
    size = head_dim(model.config)
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        hd = getattr(attn, "head_dim", None) or size
        kind, originals, width = (
            (planned[i].kind, planned[i].originals, planned[i].width) if i < len(planned) else ("keep", (i,), 1)
        )
        out.append(
            LayerWidths(
                i,
                kind,
                originals,
                width,
                attn.q_proj.out_features // hd,
                attn.k_proj.out_features // hd,
                hd,
                getattr(mlp, MLP_ROWS[0]).out_features,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Building wide layers
# ---------------------------------------------------------------------------------------------
def wide_config(config: Any, group: int) -> Any:
    """A copy of `config` for one layer holding `group` layers' heads and MLP neurons."""
    wide = copy.copy(config)
    wide.head_dim = head_dim(config)  # otherwise derived from hidden_size / heads and would shrink
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


def stack_as_views(params: list[nn.Parameter], dim: int, staged: list | None = None) -> torch.Tensor:
    """`params` concatenated along `dim`; each parameter's data becomes a view of its slice, so its
    old memory is freed and the parameter object (and its value) stays what it was. The transform
    stages wide layers with it (recording each change in `staged`, for `transform._unstage`); the
    fast decode loop fuses q/k/v and gate/up with it (`runtime.generate.fuse_projections`)."""
    stacked = torch.cat([p.detach() for p in params], dim)
    offset = 0
    for p in params:
        if staged is not None:
            # a parameter that already was a view (fuse_projections) gets that view back; the
            # memory it sees is held elsewhere anyway
            staged.append((p, p.data if _is_part_of_larger(p) else None))
        size = p.shape[dim]
        p.data = stacked.narrow(dim, offset, size)
        offset += size
    return stacked


def _is_part_of_larger(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def widen_head_norms(layer: nn.Module, arch: str, wide_cfg: Any) -> None:
    """Per-head q/k norms (Qwen3) get one weight row per head, so each member keeps its own weight."""
    heads = {"q_norm": wide_cfg.num_attention_heads, "k_norm": wide_cfg.num_key_value_heads}
    for name in SUPPORTED[arch]:
        norm = getattr(layer.self_attn, name)
        w = norm.weight
        # the norm sees (batch, seq, heads, head_dim): a (heads, head_dim) weight broadcasts per head
        norm.weight = nn.Parameter(torch.ones(heads[name], w.shape[-1], dtype=w.dtype, device=w.device))
