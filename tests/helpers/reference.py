"""An independent, slow reference for plans: evaluates the definition layer by layer on the
ORIGINAL model's modules, without any weight fusion.

    parallel group G, input x:  h = x + sum_i Attn_i(Norm_i(x));  out = h + sum_i MLP_i(Norm'_i(h))
"""

from __future__ import annotations

import copy

import torch

from truedepth.core.plan import as_plan


def causal_mask(batch: int, seq: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None].expand(batch, 1, seq, seq)


def run_parallel_group(members, x, pos, mask):
    attn = sum(m.self_attn(m.input_layernorm(x), position_embeddings=pos, attention_mask=mask)[0] for m in members)
    h = x + attn
    return h + sum(m.mlp(m.post_attention_layernorm(h)) for m in members)


def run_layer(layer, x, pos, mask):
    return run_parallel_group([layer], x, pos, mask)


def averaged_layer(members):
    """A copy of the first member whose parameters are the mean of all members' parameters."""
    merged = copy.deepcopy(members[0])
    with torch.no_grad():
        for name, p in merged.named_parameters():
            p.copy_(torch.stack([dict(m.named_parameters())[name] for m in members]).mean(0))
    return merged


@torch.no_grad()
def reference_logits(model, plan, input_ids):
    """Logits of `model` (untransformed) under `plan`, computed from the definition."""
    plan = as_plan(plan)
    inner = model.model
    x = inner.embed_tokens(input_ids)
    b, s = input_ids.shape
    pos_ids = torch.arange(s, device=input_ids.device)[None].expand(b, s)
    pos = inner.rotary_emb(x, pos_ids)
    mask = causal_mask(b, s, x.dtype).to(x.device)
    for block in plan.blocks(len(inner.layers)):
        members = [inner.layers[i] for i in block.layers]
        if block.kind == "parallel":
            x = run_parallel_group(members, x, pos, mask)
        elif block.kind == "merge":
            x = run_layer(averaged_layer(members), x, pos, mask)
        else:
            x = run_layer(members[0], x, pos, mask)
    return model.lm_head(inner.norm(x))
