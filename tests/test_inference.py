"""After any plan, generate works with dynamic and static caches, sampled, compiled, and hidden states."""

import pytest
import torch
from helpers.tiny import tiny_model

import truedepth

PLANS = ["base", "parallel=2:6", "parallel=1:7/3", "parallel=0:2,skip=4,merge=5:7,shuffle=7:8"]


def greedy(model, ids, n=8, **kw):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def greedy_without_cache(model, ids, n=8):
    """Token by token, recomputing the whole prefix each step: no KV cache involved."""
    for _ in range(n):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("plan", PLANS)
def test_cached_greedy_equals_recomputed_and_static_equals_dynamic(arch, plan):
    model = truedepth.apply_plan(tiny_model(arch, layers=8), plan)
    ids = torch.randint(3, 128, (2, 6))
    dynamic = greedy(model, ids)
    assert torch.equal(dynamic, greedy_without_cache(model, ids))
    assert torch.equal(dynamic, greedy(model, ids, cache_implementation="static"))


@pytest.mark.parametrize("plan", ["parallel=2:6", "parallel=0:6/3,skip=7"])
def test_cache_and_hidden_states_have_one_entry_per_remaining_layer(plan):
    model = truedepth.apply_plan(tiny_model("llama", layers=8), plan)
    depth = truedepth.Plan.parse(plan).depth(8)
    out = model(torch.randint(3, 128, (1, 5)), use_cache=True, output_hidden_states=True)
    assert len(out.past_key_values.layers) == depth
    assert len(out.hidden_states) == depth + 1  # embeddings + one per layer
    # a wide layer caches the KV heads of all its members
    widths = model.config.truedepth["layer_widths"]
    kv = model.config.num_key_value_heads
    for layer, w in zip(out.past_key_values.layers, widths):
        assert layer.keys.shape[1] == kv * w


def test_sampled_generation_is_seeded_and_valid():
    model = truedepth.apply_plan(tiny_model("mistral", layers=6), "parallel=2:6")
    ids = torch.randint(3, 128, (2, 4))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, pad_token_id=0)
    torch.manual_seed(1)
    a = model.generate(ids, **kw)
    torch.manual_seed(1)
    b = model.generate(ids, **kw)
    assert torch.equal(a, b) and a.shape == (2, 10) and int(a.max()) < 128
    torch.manual_seed(2)
    assert not torch.equal(model.generate(ids, **kw), a)  # another seed, other tokens: it really samples


def test_sampled_first_token_follows_the_lp_models_filtered_distribution():
    """Fails for greedy decoding (all mass on one token) and for a wrong temperature or top-k."""
    model = truedepth.apply_plan(tiny_model("mistral", layers=6), "parallel=2:6")
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(3))
    n, temperature, top_k = 4000, 2.0, 4
    with torch.no_grad():
        logits = model(ids).logits[0, -1] / temperature
    kth = logits.topk(top_k).values[-1]
    want = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    assert want.max() < 0.6  # several likely tokens: greedy could not match this distribution
    torch.manual_seed(0)
    out = model.generate(
        ids.expand(n, -1),
        max_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=None,
        pad_token_id=0,
    )
    freq = torch.bincount(out[:, -1], minlength=want.numel()).float() / n
    assert freq[want == 0].sum() == 0
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)  # ~4 standard deviations at n=4000


def test_torch_compile_gives_same_logits():
    model = truedepth.apply_plan(tiny_model("llama", layers=4), "parallel=0:4")
    ids = torch.randint(3, 128, (1, 7))
    want = model(ids).logits
    compiled = torch.compile(model, backend="eager" if not torch.cuda.is_available() else "inductor")
    assert torch.allclose(compiled(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_static_generate_matches_eager():
    """transformers' own compiled path: static cache + torch.compile (inductor, CPU here)."""
    model = truedepth.apply_plan(tiny_model("llama", layers=4), "parallel=0:4")
    ids = torch.randint(3, 128, (1, 5))
    want = greedy(model, ids, n=4)
    model.forward = torch.compile(model.forward, dynamic=False)
    assert torch.equal(greedy(model, ids, n=4, cache_implementation="static"), want)
