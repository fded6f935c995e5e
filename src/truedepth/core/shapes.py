"""Random-weight models of real sizes, built from a config with no download.

Decode speed depends on the shapes of the tensors, not on their values, so a benchmark of
Llama-2-7B needs its config, not its 13 GB of weights. `build_shape(name, dtype, device)` builds
the model on the meta device (no memory) and then materialises every tensor directly on the
target device with random values: a 7B model never passes through host memory.

    from truedepth.core.shapes import build_shape
    model = build_shape("llama-2-7b", dtype="bf16", device="cuda")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..utils.errors import UserError


@dataclass(frozen=True)
class Shape:
    """A published architecture's dimensions, and the LP plan our benchmarks use for it."""

    name: str
    model_type: str
    config: dict[str, Any]
    default_plan: str
    note: str = ""
    aliases: tuple[str, ...] = field(default=())


_LLAMA3_ROPE_3B = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3_ROPE_8B = dict(_LLAMA3_ROPE_3B, factor=8.0)

SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape(
            "llama-2-7b",
            "llama",
            dict(
                hidden_size=4096,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                intermediate_size=11008,
                vocab_size=32000,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            "parallel=16:30",
            "Llama 2 7B: the paper's main model; LP layers 16-29 (delta 14)",
        ),
        Shape(
            "llama-3.2-3b",
            "llama",
            dict(
                hidden_size=3072,
                num_hidden_layers=28,
                num_attention_heads=24,
                num_key_value_heads=8,
                head_dim=128,
                intermediate_size=8192,
                vocab_size=128256,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                rope_parameters=_LLAMA3_ROPE_3B,
            ),
            "parallel=14:24",
            "Llama 3.2 3B: the paper's second model; LP layers 14-23 (delta 10)",
        ),
        Shape(
            "llama-3.1-8b",
            "llama",
            dict(
                hidden_size=4096,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                intermediate_size=14336,
                vocab_size=128256,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                rope_parameters=_LLAMA3_ROPE_8B,
            ),
            "parallel=16:30",
            "Llama 3.1 8B",
        ),
        Shape(
            "qwen2.5-7b",
            "qwen2",
            dict(
                hidden_size=3584,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                head_dim=128,
                intermediate_size=18944,
                vocab_size=152064,
                max_position_embeddings=32768,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            "parallel=14:24",
            "Qwen2.5 7B (q/k/v biases)",
        ),
        Shape(
            "qwen2.5-0.5b",
            "qwen2",
            dict(
                hidden_size=896,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                head_dim=64,
                intermediate_size=4864,
                vocab_size=151936,
                max_position_embeddings=32768,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            "parallel=12:22",
            "Qwen2.5 0.5B: even head counts and small enough for TP benchmarks on a CPU",
        ),
        Shape(
            "smollm2-135m",
            "llama",
            dict(
                hidden_size=576,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                head_dim=64,
                intermediate_size=1536,
                vocab_size=49152,
                max_position_embeddings=8192,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            ),
            "parallel=16:28",
            "SmolLM2-135M: the shape of truedepth's offline default model",
            ("default",),
        ),
        Shape(
            "tiny",
            "llama",
            dict(
                hidden_size=64,
                num_hidden_layers=8,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                intermediate_size=96,
                vocab_size=128,
                max_position_embeddings=1024,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            "parallel=2:6",
            "a toy shape for tests (about 0.2M parameters)",
        ),
    ]
}
_ALIASES = {a: s.name for s in SHAPES.values() for a in s.aliases}


def shape_names() -> list[str]:
    return list(SHAPES)


def get_shape(name: str) -> Shape:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in SHAPES:
        raise UserError(
            f"unknown shape {name!r}; choose one of {', '.join(SHAPES)} (or benchmark a real checkpoint with --model)."
        )
    return SHAPES[key]


def shape_config(name: str, attn_implementation: str = "sdpa", arch: str | None = None, **overrides: Any) -> Any:
    """The transformers config of a shape (special tokens set so `generate` needs no tokenizer).

    `arch` builds the same dimensions as another supported architecture, e.g.
    ``shape_config("tiny", arch="qwen3", num_hidden_layers=4)``; `overrides` change any field."""
    from transformers import AutoConfig

    shape = get_shape(name)
    kw = dict(shape.config, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    config = AutoConfig.for_model(arch or shape.model_type, **kw)
    config._attn_implementation = attn_implementation
    return config


def build_shape(
    name: str,
    dtype: Any = None,
    device: Any = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    arch: str | None = None,
    **overrides: Any,
) -> Any:
    """A random-weight model of shape `name` on `device`, in eval mode.

    Built on the meta device, then materialised in place on `device`, so peak memory is the
    model itself (a 7B bf16 model needs 13.5 GB on the GPU and nothing on the host). Weights are
    random normal (std 0.02), norm weights random around 1, so that a wrong fold of the norm into
    a projection would show; values do not change speed.
    """
    from transformers import AutoModelForCausalLM

    from ..utils.device import as_dtype, default_device

    torch_dtype = as_dtype(dtype) or torch.float32
    device = torch.device(device or default_device())
    config = shape_config(name, attn_implementation, arch, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.to_empty(device=device)  # allocates uninitialised storage on the target device only
    _randomize(model, seed)
    _rebuild_rotary_buffers(model, device)
    model.tie_weights()  # to_empty gives each reference to a tied weight its own storage
    return model.eval()


@torch.no_grad()
def _randomize(model: Any, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.8, 1.2, generator=gen)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _rebuild_rotary_buffers(model: Any, device: torch.device) -> None:
    """Rotary embeddings hold computed (non-persistent) buffers that to_empty left uninitialised."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and hasattr(child, "config"):
                with torch.device(device):
                    setattr(parent, child_name, type(child)(child.config))


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def describe(name: str) -> str:
    shape = get_shape(name)
    c = shape.config
    kv = c.get("num_key_value_heads", c["num_attention_heads"])
    return (
        f"{shape.name}: {shape.model_type}, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']} heads / {kv} KV heads, FFN {c['intermediate_size']}, vocab "
        f"{c['vocab_size']}; default plan {shape.default_plan}. {shape.note}"
    )
