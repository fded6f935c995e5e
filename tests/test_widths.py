"""`core.arch.layer_widths`: every layer's widths from a config, against an independent count.

The expected widths are written out by hand from the plan (which original layers each new layer
holds), and checked again against the projections of the model the transform really builds."""

from __future__ import annotations

import json

import pytest
from helpers.tiny import tiny_config, tiny_model

import truedepth
from truedepth.core.arch import (
    LayerWidths,
    layer_widths,
    measured_widths,
    original_depth,
    recorded_widths,
    transformed_record,
)
from truedepth.core.plan import PlanError

# (plan, the original layers of each layer of the transformed model, the kind of each) on 8 layers
PLANS = {
    "base": ([(i,) for i in range(8)], ["keep"] * 8),
    "parallel=2:6": (
        [(0,), (1,), (2, 3), (4, 5), (6,), (7,)],
        ["keep", "keep", "parallel", "parallel", "keep", "keep"],
    ),
    "parallel=1:7/3": ([(0,), (1, 2, 3), (4, 5, 6), (7,)], ["keep", "parallel", "parallel", "keep"]),
    "skip=3:5": ([(0,), (1,), (2,), (5,), (6,), (7,)], ["keep"] * 6),
    "parallel=0:3/3,skip=5,merge=6:8": ([(0, 1, 2), (3,), (4,), (6, 7)], ["parallel", "keep", "keep", "merge"]),
}
# (arch, config overrides, heads, KV heads, head size, MLP size of one original layer)
SHAPES = {
    "llama": ("llama", {}, 4, 2, 16, 96),  # GQA: 4 heads share 2 KV heads; head size hidden / heads
    "qwen3-head-dim": ("qwen3", {"head_dim": 32}, 4, 2, 32, 96),  # explicit head size != hidden / heads
    "mqa": ("llama", {"num_key_value_heads": 1, "intermediate_size": 80}, 4, 1, 16, 80),
    "mha": ("qwen2", {"num_key_value_heads": 4}, 4, 4, 16, 96),
}


def expected(shape: str, plan: str) -> list[tuple]:
    _, _, heads, kv, hd, mlp = SHAPES[shape]
    members, kinds = PLANS[plan]
    out = []
    for i, (layers, kind) in enumerate(zip(members, kinds, strict=True)):
        k = len(layers) if kind == "parallel" else 1
        out.append((i, kind, layers, k, heads * k, kv * k, hd, mlp * k))
    return out


def as_tuples(widths: list[LayerWidths]) -> list[tuple]:
    return [(w.index, w.kind, w.originals, w.width, w.heads, w.kv_heads, w.head_dim, w.intermediate) for w in widths]


def config_of(shape: str):
    arch, overrides, *_ = SHAPES[shape]
    return tiny_config(arch, 8, **overrides)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("plan", PLANS)
def test_widths_from_config_and_plan(shape, plan):
    config = config_of(shape)
    assert as_tuples(layer_widths(config, plan)) == expected(shape, plan)
    if plan == "base":
        assert layer_widths(config) == layer_widths(config, plan)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("plan", [p for p in PLANS if p != "base"])
def test_transformed_config_records_the_same_widths_as_its_modules(shape, plan):
    arch, overrides, heads, kv, hd, mlp = SHAPES[shape]
    model = truedepth.apply_plan(tiny_model(arch, 8, **overrides), plan)
    want = expected(shape, plan)
    assert as_tuples(layer_widths(model.config)) == want  # from the record alone
    assert as_tuples(measured_widths(model)) == want  # from the projections the transform built
    # the config.json a saved model carries gives the same answer as the live config
    assert as_tuples(layer_widths(json.loads(model.config.to_json_string()))) == want
    assert recorded_widths(model.config) == [w[3] for w in want] and original_depth(model.config) == 8
    hidden = model.config.hidden_size
    for w, layer in zip(layer_widths(model.config), model.model.layers, strict=True):
        matrices = [
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ]
        assert w.matrix_weights(hidden) == sum(m.weight.numel() for m in matrices)
        attn = layer.self_attn
        assert attn.q_proj.out_features == w.heads * hd and attn.k_proj.out_features == w.kv_heads * hd
    # plans refer to the original layers: a second one is refused, the identity plan is not
    with pytest.raises(PlanError, match="already transformed"):
        layer_widths(model.config, "parallel=0:2")
    assert layer_widths(model.config, "base") == layer_widths(model.config)


def test_original_model_record_accessors():
    config = config_of("llama")
    assert transformed_record(config) is None and recorded_widths(config) == [1] * 8 and original_depth(config) == 8
    assert as_tuples(measured_widths(tiny_model("llama", 8))) == expected("llama", "base")


def test_head_size_is_derived_when_the_config_names_none():
    """A config.json without head_dim (older Llama files): hidden size / heads."""
    config = {
        "model_type": "llama",
        "num_hidden_layers": 3,
        "hidden_size": 96,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    }
    assert [(w.heads, w.kv_heads, w.head_dim, w.intermediate) for w in layer_widths(config, "parallel=0:2")] == [
        (12, 4, 16, 128),
        (6, 2, 16, 64),
    ]
    del config["num_key_value_heads"]  # no KV heads named: one per head
    assert [w.kv_heads for w in layer_widths(config)] == [6, 6, 6]


def test_a_record_without_a_plan_still_gives_widths():
    """vLLM's checks read a config.json that may record only the widths."""
    config = {
        "model_type": "truedepth_llama",
        "num_hidden_layers": 3,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 10,
        "truedepth": {"layer_widths": [1, 2, 1]},
    }
    assert [
        (w.kind, w.originals, w.width, w.heads, w.kv_heads, w.head_dim, w.intermediate) for w in layer_widths(config)
    ] == [("keep", (), 1, 9, 3, None, 10), ("parallel", (), 2, 18, 6, None, 20), ("keep", (), 1, 9, 3, None, 10)]
    assert layer_widths(config)[1].describe() == "layer 1 (wide: 2 original layers in parallel)"


def test_describe_names_the_original_layers():
    ws = layer_widths(config_of("llama"), "parallel=0:3/3,skip=5,merge=6:8")
    assert [w.describe() for w in ws] == [
        "layer 0 (wide: original layers 0, 1, 2 in parallel)",
        "layer 1 (original layer 3)",
        "layer 2 (original layer 4)",
        "layer 3 (merge of original layers 6, 7)",
    ]
    assert layer_widths(config_of("llama"))[2].describe() == "layer 2"
