"""The lean decode loop: same greedy tokens as `model.generate`, same sampling distribution as
transformers' warpers, fused projections that change nothing but the kernels."""

import tempfile

import pytest
import torch
from helpers.tiny import ARCHS, char_tokenizer, tiny_model

import truedepth
from truedepth import cli
from truedepth.runtime.generate import (
    ContextLengthError,
    EmptyPromptError,
    FastGenerator,
    filter_logits,
    fuse_projections,
    generate_fast,
    is_fused,
    sample_next,
    unfuse_projections,
)

PLAN = "parallel=2:6"


def hf_greedy(model, ids, n, **kw):
    kw.setdefault("eos_token_id", None)
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw
    )


def lp_model(arch="llama", attn="eager", **kw):
    model = tiny_model(arch, layers=8, **kw)
    model.config._attn_implementation = attn  # before the transform: wide layers copy the config
    truedepth.apply_plan(model, PLAN)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_generate_for_lp_models(arch):
    model = lp_model(arch)
    ids = torch.randint(3, 128, (2, 7))
    want = hf_greedy(model, ids, 24)
    gen = FastGenerator(model, max_batch=2, max_seq=64, compile=False)
    assert torch.equal(gen.generate(ids, 24), want)
    assert torch.equal(gen.generate(ids, 24), want)  # the reused static cache was reset


@pytest.mark.parametrize("fuse", [False, True])
def test_compiled_step_is_one_graph_and_matches_generate(fuse):
    """The generator's own torch.compile call runs, and the step becomes ONE graph without a graph
    break (so on GPU one CUDA graph covers it), compiled once and reused for every token. The
    backend wraps aot_eager: dynamo and AOTAutograd run, code generation (minutes on CPU) does not."""
    from torch._dynamo.utils import counters

    model = lp_model("llama", attn="sdpa")  # what real models use
    ids = torch.randint(3, 128, (1, 9))
    want = hf_greedy(model, ids, 12)
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    gen = FastGenerator(model, max_batch=1, max_seq=32, compile=True, backend=counting_backend, fuse=fuse)
    try:
        assert torch.equal(gen.generate(ids, 12), want)
        assert torch.equal(gen.generate(ids, 12), want)  # the second generation reuses the graph
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert len(graphs) == 1, [g.code[:300] for g in graphs]
    finally:
        torch._dynamo.reset()


def test_lp_model_under_transformers_compiled_path():
    """transformers' own path: static cache + torch.compile inside generate (forced on CPU)."""
    from transformers import CompileConfig

    model = lp_model("qwen2")
    ids = torch.randint(3, 128, (2, 6))
    want = hf_greedy(model, ids, 10)
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    got = hf_greedy(model, ids, 10, cache_implementation="static", compile_config=config)
    assert hasattr(model, "_compiled_call")  # generate really went through torch.compile
    assert torch.equal(got, want)
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_change_nothing_but_kernels(arch):
    model = lp_model(arch)
    ids = torch.randint(3, 128, (2, 9))
    keys = list(model.state_dict())
    want = model(ids).logits
    fuse_projections(model)
    assert is_fused(model)
    attn = model.model.layers[2].self_attn  # a wide layer
    assert attn.q_proj.weight.data_ptr() == attn._td_qkv_weight.data_ptr()  # views: no extra memory
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn._td_qkv_weight.untyped_storage().data_ptr()
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    unfuse_projections(model)
    assert not is_fused(model) and type(attn).__name__ == type(model.model.layers[0].mlp).__name__.replace(
        "MLP", "Attention"
    )
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_fused_model_saves_and_reloads():
    model = lp_model("llama")
    ids = torch.randint(3, 128, (1, 9))
    want = model(ids).logits
    fuse_projections(model)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        from transformers import AutoModelForCausalLM

        again = AutoModelForCausalLM.from_pretrained(d)
    torch.testing.assert_close(again(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.8), (1.3, 10, 0.5), (1.0, None, 0.999), (0.5, 1, None)]
)
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p:
        want = TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_sampling_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(40000, 1)
    probs = filter_logits(logits[:1], top_k=3).softmax(-1)[0]
    draws = sample_next(logits, do_sample=True, top_k=3)[:, 0]
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[3:].sum() == 0  # outside the top 3: never drawn
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert torch.equal(sample_next(logits[:3], do_sample=True, top_k=1), logits[:3].argmax(-1, keepdim=True))


def test_eos_stops_and_pads_like_generate():
    model = lp_model("llama")
    ids = torch.randint(3, 128, (2, 5))
    free = hf_greedy(model, ids, 30)[:, 5:]
    eos = int(free[0, 6])  # a token row 0 produces early
    want = hf_greedy(model, ids, 30, eos_token_id=eos)
    gen = FastGenerator(model, max_batch=2, max_seq=64, compile=False)
    got = gen.generate(ids, 30, eos_token_id=eos, pad_token_id=0, eos_check_every=4)
    assert torch.equal(got, want)


def test_sampled_generation_is_reproducible_and_on_device():
    model = lp_model("llama")
    ids = torch.randint(3, 128, (2, 5))
    gen = FastGenerator(model, max_batch=2, max_seq=64, compile=False)
    torch.manual_seed(1)
    a = gen.generate(ids, 16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(1)
    b = gen.generate(ids, 16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (2, 21) and torch.equal(a[:, :5], ids)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda g, ids: g.generate(torch.cat([ids, ids, ids]), 4), "max_batch"),
        (lambda g, ids: g.generate(ids, 60), "max_seq"),
        (lambda g, ids: g.generate(ids[0], 4), "2-D"),
        (lambda g, ids: g.generate(ids, 0), "max_new_tokens"),
        (lambda g, ids: g.generate(ids, 4, top_k=5), "do_sample=True"),
        (lambda g, ids: g.generate(ids, 4, do_sample=True, temperature=0), "temperature"),
        (lambda g, ids: g.generate(ids, 4, do_sample=True, top_p=1.5), "top_p"),
    ],
)
def test_bad_input_is_named_with_the_fix(call, match):
    gen = FastGenerator(tiny_model("llama", layers=2), max_batch=2, max_seq=32, compile=False)
    with pytest.raises(ValueError, match=match):
        call(gen, torch.randint(3, 128, (2, 5)))


# ---- requests the model cannot serve are refused before anything is allocated -----------------
def test_more_tokens_than_the_model_has_positions_is_refused_with_the_limit():
    model, tok = lp_model("llama", max_position_embeddings=16), char_tokenizer()
    with pytest.raises(ContextLengthError) as err:
        generate_fast(model, tok, "hello", max_new_tokens=100000, chat=False)
    message = str(err.value)
    assert "16 positions" in message and "max_new_tokens <= 11" in message and "\n" not in message
    assert "_truedepth_fast_generator" not in model.__dict__  # no generator, no static cache allocated
    ids = torch.randint(3, 128, (1, 6))
    gen = FastGenerator(model, max_batch=1, max_seq=64, compile=False)
    with pytest.raises(
        ContextLengthError, match=r"prompt \(6 tokens\) \+ max_new_tokens \(11\) = 17 exceeds the model's 16"
    ):
        gen.generate(ids, 11)
    assert gen._cache is None
    assert gen.generate(ids, 10).shape == (1, 16)  # exactly the model's positions is fine


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        [],
        torch.empty(1, 0, dtype=torch.long),
        torch.empty(0, dtype=torch.long),
        torch.empty(0, 4, dtype=torch.long),
    ],
)
def test_an_empty_prompt_is_refused_with_our_message(prompt):
    model, tok = lp_model("llama"), char_tokenizer()
    with pytest.raises(EmptyPromptError, match="empty|no prompts"):
        generate_fast(model, tok, prompt, max_new_tokens=4, chat=False)
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        with pytest.raises(EmptyPromptError):
            FastGenerator(model, compile=False).generate(prompt, 4)


@pytest.mark.parametrize("fast", [[], ["--fast"]])
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-new-tokens", "100000", "hello"], ["256 positions", "<= 251"]),
        (["--max-new-tokens", "4", ""], ["prompt is empty"]),
    ],
)
def test_generate_command_refuses_what_the_model_cannot_serve(tiny4_dir, fast, argv, words, capsys):
    assert cli.main(["generate", "--model", str(tiny4_dir), "--device", "cpu", *fast, *argv]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert out == "" and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("truedepth generate: error: ")
    for w in words:
        assert w in errors[0]


@pytest.mark.integration
def test_generate_fast_on_the_default_model_matches_generate():
    model, tok = truedepth.load("default")
    truedepth.apply_plan(model, "parallel=16:28")
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    want_text = tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    assert generate_fast(model, tok, prompt, max_new_tokens=12, chat=False) == want_text
    assert generate_fast(model, tok, ids, max_new_tokens=12) == want_text  # the form `generate --fast` passes
