"""q/k/v as one GEMM and gate/up as one GEMM in every layer, for the lean decode loop.

The original parameters become views of the fused tensors (`core.arch.stack_as_views`), so memory is
unchanged; `unfuse_projections` gives every projection its own weight back before training or saving.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.arch import ATTN_ROWS, MLP_ROWS, stack_as_views

_FUSED_CLASSES: dict[type, type] = {}


def _attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The architecture's attention forward with q/k/v computed by one GEMM (same math)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = F.linear(hidden_states, self._td_qkv_weight, self._td_qkv_bias)
    q, k, v = qkv.split(self._td_qkv_sizes, dim=-1)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    if hasattr(self, "q_norm"):  # Qwen3: per-head norms before rotary
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = self._td_rotary(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._td_eager_attention)
    out, weights = attention(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=self._td_sliding_window(),
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _sliding_window(self: nn.Module) -> int | None:
    return getattr(self, "sliding_window", None) or getattr(self.config, "sliding_window", None)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, self._td_gate_up_weight, self._td_gate_up_bias).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def _fused_class(cls: type, forward: Any, extra: dict[str, Any]) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(
            f"Fused{cls.__name__}", (cls,), {"forward": forward, "_td_unfused_class": cls, **extra}
        )
    return _FUSED_CLASSES[cls]


def _stack_into_buffers(owner: nn.Module, linears: list[nn.Linear], name: str) -> list[int]:
    """Concatenate the linears' weights (and biases) into one buffer of `owner`; each linear's
    parameters become views of it (`core.arch.stack_as_views`, as the transform stages wide
    layers), so the model's memory and state_dict keys are unchanged."""
    for attr in ("weight", "bias"):
        parts = [getattr(lin, attr) for lin in linears]
        # a buffer, not a parameter: not saved, not trained, but a static input for CUDA graphs
        owner.register_buffer(
            f"_td_{name}_{attr}", None if parts[0] is None else stack_as_views(parts, 0), persistent=False
        )
    return [lin.out_features for lin in linears]


def fuse_projections(model: nn.Module) -> nn.Module:
    """Run q/k/v as one GEMM and gate/up as one GEMM in every decoder layer (in place).

    Fewer, larger kernels per decode step; the result is the same up to float rounding. The
    model's parameters become views of the fused tensors: memory, `state_dict` keys and
    `generate` are unchanged. Call it after moving the model to its device (`.to()` would copy
    the views apart) and `unfuse_projections(model)` before training or saving it.
    """
    from ..core.arch import check_supported, decoder_layers

    check_supported(model)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "_td_unfused_class"):
            rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            eager = sys.modules[type(attn).__module__].eager_attention_forward
            attn._td_qkv_sizes = _stack_into_buffers(attn, [getattr(attn, n) for n in ATTN_ROWS], "qkv")
            attn.__class__ = _fused_class(
                type(attn),
                _attention_forward,
                {
                    "_td_rotary": staticmethod(rotary),
                    "_td_eager_attention": staticmethod(eager),
                    "_td_sliding_window": _sliding_window,
                },
            )
        if not hasattr(mlp, "_td_unfused_class"):
            _stack_into_buffers(mlp, [getattr(mlp, n) for n in MLP_ROWS], "gate_up")
            mlp.__class__ = _fused_class(type(mlp), _mlp_forward, {})
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undo `fuse_projections`: every projection owns its weight again (safe to save or train)."""
    from ..core.arch import decoder_layers

    for layer in decoder_layers(model):
        for module, names, key in ((layer.self_attn, ATTN_ROWS, "qkv"), (layer.mlp, MLP_ROWS, "gate_up")):
            if not hasattr(module, "_td_unfused_class"):
                continue
            for name in names:
                lin = getattr(module, name)
                for attr in ("weight", "bias"):
                    p = getattr(lin, attr)
                    if p is not None:
                        setattr(lin, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            for attr in ("weight", "bias"):
                delattr(module, f"_td_{key}_{attr}")
            module.__class__ = module._td_unfused_class
    return model


def is_fused(model: nn.Module) -> bool:
    from ..core.arch import decoder_layers

    return any(hasattr(layer.self_attn, "_td_unfused_class") for layer in decoder_layers(model))
