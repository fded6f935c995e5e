"""A saved truedepth model as a vLLM model, built from vLLM's own layers.

An LP wide layer is an ordinary decoder layer with more heads, KV heads and MLP neurons (method.md),
so the model is vLLM's `LlamaForCausalLM` whose `layer_type` hook builds each decoder layer from a
config of its own: the model's config with heads, KV heads and MLP size times the layer's width
(`truedepth.core.arch.wide_config`, the same one the transform builds its wide layers from). vLLM's
parallel linear layers shard every layer, wide or not, and its `AutoWeightsLoader` reads the
saved q/k/v and gate/up tensors into the stacked `qkv_proj` and `gate_up_proj` shards.

Per architecture, the layer is vLLM's own:
- llama, mistral: `LlamaDecoderLayer` (vLLM's Mistral layer is the same for HF checkpoints);
- qwen2: `LlamaDecoderLayer` with q/k/v biases (vLLM's Qwen2 layer derives head_dim from
  hidden_size / heads, which a wide layer must not do);
- qwen3: `Qwen3DecoderLayer`; in a wide layer, its per-head q/k norms carry one weight row per
  head (each member keeps its own weight, core.transform.fused_state), so they become `HeadwiseRMSNorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs

from ...core.arch import QKV_BIAS, SUPPORTED, base_model_type, recorded_widths, wide_config
from . import check_config

HEAD_COUNT_OF_NORM = {"q_norm": "num_heads", "k_norm": "num_kv_heads"}  # per-head norm -> its heads


class HeadwiseRMSNorm(nn.Module):
    """RMSNorm over head_dim with one weight row per head, for this rank's heads only.

    The normalisation is vLLM's RMSNorm (without weight); the weight rows of this rank's heads
    are taken at load time from the same head offset that vLLM's QKVParallelLinear uses."""

    def __init__(self, heads: int, first_head: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(head_dim, eps=eps, has_weight=False)
        self.first_head = first_head
        self.weight = nn.Parameter(torch.ones(heads, head_dim), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.load_rows})

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, self.first_head, param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, heads, head_dim)
        return self.norm(x) * self.weight


def use_headwise_norms(attn: nn.Module, arch: str) -> None:
    qkv = attn.qkv_proj
    first = {
        "num_heads": qkv.tp_rank * qkv.num_heads,
        "num_kv_heads": (qkv.tp_rank // qkv.num_kv_head_replicas) * qkv.num_kv_heads,
    }
    for name in SUPPORTED[arch]:
        old = getattr(attn, name)
        count = HEAD_COUNT_OF_NORM[name]
        setattr(attn, name, HeadwiseRMSNorm(getattr(qkv, count), first[count], attn.head_dim, old.variance_epsilon))


def layer_config(config: Any, width: int) -> Any:
    """The config of one decoder layer `width` original layers wide (explicit head_dim)."""
    cfg = wide_config(config, width)
    if base_model_type(config) in QKV_BIAS:
        cfg.qkv_bias = True  # read by vLLM's LlamaDecoderLayer (q/k/v bias, none on o_proj)
    return cfg


def build_layer(*, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    """vLLM's `layer_type` hook: the decoder layer at `prefix` (``model.layers.N``), at its width."""
    config = vllm_config.model_config.hf_config
    arch = base_model_type(config)
    width = recorded_widths(config)[extract_layer_index(prefix)]
    cfg = layer_config(config, width)
    if arch != "qwen3":
        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=cfg)
    layer = Qwen3DecoderLayer(
        config=cfg, cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=prefix
    )
    if width > 1:
        use_headwise_norms(layer.self_attn, arch)
    return layer


class TrueDepthForCausalLM(LlamaForCausalLM):
    """vLLM's Llama causal LM with per-layer widths read from ``config.truedepth``."""

    def __init__(
        self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: Callable[..., nn.Module] = build_layer
    ) -> None:
        model_config = vllm_config.model_config
        # also checked while vLLM builds its config; here again in the worker, before any weight loads
        check_config(model_config.hf_config.to_dict(), get_tensor_model_parallel_world_size(), where=model_config.model)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
