"""Export to GGUF (llama.cpp `deci`), checked by running the files in llama.cpp (llama-cpp-python).

Tolerance (TOL): llama.cpp's logits of an f32 file against transformers' fp32 logits of the same
model, as max |difference| / max |logit| over all positions and the vocabulary, with llama.cpp's
KV cache in f32 (its default f16 cache alone moves the default model's logits by up to 5e-2,
1.5e-3 of the logit scale). The default model was de-quantised from Q4_1, so its weights are
exact in f32 and the export itself rounds nothing; what differs is the arithmetic: ggml's blocked
f32 dot products sum in another order than torch's GEMMs, and 30 layers carry the ulp-level
differences forward. Measured (2026-11-30, 64 held-out tokens): max |difference| 1.1e-4 (base),
0.8e-4 (parallel=20:28), 1.5e-4 (parallel=18:27/3,skip=28) with max |logit| ~35, i.e. 2.3e-6 to
4.3e-6 relative; tiny random models 5e-7. TOL = 3e-5 leaves a 7x margin, while a wrong head
layout, rotary permutation, norm or width changes logits by a large part of their scale.
"""

from __future__ import annotations

import copy
import os

import gguf
import numpy as np
import pytest
import torch
from helpers.tiny import tiny_model

import truedepth
from truedepth import cli
from truedepth.core.loading import default_gguf
from truedepth.deploy.gguf import GGUFExportError, export_gguf

pytest.importorskip("llama_cpp")  # a dev requirement; skipped where llama-cpp-python is not built
from truedepth.deploy import llamacpp  # noqa: E402

TOL = 3e-5
NEAR_TIE = 1e-3  # top-2 log-probability gap under which greedy choices may legitimately differ
DEFAULT_VOCAB = 49152  # tiny models share the default GGUF's tokenizer, so llama.cpp can load them
# One llama.cpp thread: its threads spin-wait at every barrier, and on a machine shared with other
# jobs two threads ran 20x slower than one here (1.1 against 23.6 decode tok/s at load average 8).
THREADS = 1


def relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().float().numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def open_gguf(path, n_ctx=64, **kw):
    return llamacpp.open_gguf(path, n_ctx=n_ctx, threads=THREADS, **kw)


def gguf_logits(path, ids) -> np.ndarray:
    llm = open_gguf(path, n_ctx=max(64, len(ids)), f32_cache=True)
    try:
        return llamacpp.logits(llm, ids)
    finally:
        llm.close()


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# Tiny random models
# ---------------------------------------------------------------------------------------------
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "arch, plan, extra",
    [
        ("llama", "parallel=0:2,parallel=3:6/3", {}),
        ("qwen2", "parallel=1:3,skip=5", {}),
        ("llama", "parallel=2:4,merge=4:6", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
        ("mistral", "parallel=0:3/3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4}}),
    ],
)
def test_tiny_model_with_wide_layers_matches_transformers(tmp_path, arch, plan, extra):
    # a wide FIRST layer: llama.cpp must read the head size from the file, not derive it from
    # hidden_size / (first layer's heads); qwen2 adds q/k/v biases, permuted with their rows;
    # Llama 3 rope scaling becomes llama.cpp's rope_freqs, linear scaling its scaling keys; tied
    # embeddings have no output tensor
    model = truedepth.apply_plan(tiny_model(arch, layers=6, vocab_size=DEFAULT_VOCAB, **extra), plan)
    path = export_gguf(model, None, tmp_path / "tiny.gguf", tokenizer_gguf=default_gguf())
    ids = torch.randint(0, DEFAULT_VOCAB, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    assert relative_error(gguf_logits(path, ids), hf_logits(model, ids)) < TOL


def test_qwen3_is_refused_before_writing(tmp_path):
    model = tiny_model("qwen3", layers=2, vocab_size=DEFAULT_VOCAB)
    with pytest.raises(GGUFExportError, match="q_norm/k_norm.*'deci'"):
        export_gguf(model, None, tmp_path / "q3.gguf", tokenizer_gguf=default_gguf())
    assert files_in(tmp_path) == []


def test_existing_file_needs_overwrite_and_is_left_untouched(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    model = tiny_model("llama", layers=2, vocab_size=DEFAULT_VOCAB)
    with pytest.raises(GGUFExportError, match="exists.*overwrite"):
        export_gguf(model, None, target, tokenizer_gguf=default_gguf())
    assert target.read_bytes() == b"keep me"
    mode = target.stat().st_mode
    export_gguf(model, None, target, tokenizer_gguf=default_gguf(), overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF" and files_in(tmp_path) == ["m.gguf"]
    assert target.stat().st_mode == mode  # the permissions of any new file, not a temp file's 0600


def test_unknown_type_is_refused_by_the_public_function(tmp_path):
    assert truedepth.export_gguf is export_gguf  # imported on first use
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q3_x'.*q8_0"):
        truedepth.export_gguf(tiny_model("llama", layers=2), None, tmp_path / "m.gguf", type="q3_x")
    assert files_in(tmp_path) == []


def test_a_failure_while_writing_leaves_no_file(tmp_path):
    model = tiny_model("llama", layers=2, vocab_size=DEFAULT_VOCAB)
    model.model.register_buffer("extra", torch.zeros(3))  # a tensor llama.cpp has no name for
    with pytest.raises(GGUFExportError, match="model.extra has no place"):
        export_gguf(model, None, tmp_path / "m.gguf", tokenizer_gguf=default_gguf())
    assert files_in(tmp_path) == []  # neither the file nor its temporary


@pytest.mark.parametrize(
    "type, matrices, file_type, tol",
    [
        ("f16", gguf.GGMLQuantizationType.F16, 1, 2e-3),
        ("bf16", gguf.GGMLQuantizationType.BF16, 32, 2e-2),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, 7, 2e-2),
    ],
)
def test_gguf_py_types_hold_matrices_in_the_type_and_norms_in_f32(tmp_path, type, matrices, file_type, tol):
    model = tiny_model("llama", layers=2, vocab_size=DEFAULT_VOCAB)
    path = export_gguf(model, None, tmp_path / "m.gguf", type=type, tokenizer_gguf=default_gguf())
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == file_type
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == matrices
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    ids = list(range(100, 132))
    assert relative_error(gguf_logits(path, ids), hf_logits(model, ids)) < tol  # rounded weights: close


def test_llama_cpp_quantizer_makes_k_quants(tmp_path):
    model = tiny_model("llama", layers=2, vocab_size=DEFAULT_VOCAB, hidden_size=256, intermediate_size=512, head_dim=64)
    path = export_gguf(model, None, tmp_path / "q4km.gguf", type="q4_k_m", tokenizer_gguf=default_gguf())
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert gguf.GGMLQuantizationType.Q4_K in {t.tensor_type for t in reader.tensors}
    ids = list(range(100, 132))
    got, want = gguf_logits(path, ids), hf_logits(model, ids)
    assert np.corrcoef(got.ravel(), want.numpy().ravel())[0, 1] > 0.95  # 4-bit weights: close, not equal
    assert files_in(tmp_path) == ["q4km.gguf"]  # the f32 intermediate is gone


def test_hf_tokenizer_metadata_tokenizes_like_transformers(tmp_path):
    """Without a source GGUF the vocabulary, merges, special ids and chat template are built from
    the Hugging Face tokenizer (convert_hf_to_gguf's vocabulary logic, gguf-py's SpecialVocab);
    llama.cpp then tokenizes alike, special tokens included."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from truedepth.core.loading import default_model_dir
    from truedepth.measure.eval.data import held_out_text

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = tiny_model("llama", layers=2, vocab_size=DEFAULT_VOCAB)
    path = export_gguf(model, tok, tmp_path / "hf.gguf", tokenizer_gguf=False)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    text = held_out_text()[:3000] + " <|im_start|>user\nHi!<|im_end|>"
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids


def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path):
    small = tiny_model("llama", layers=2)  # 128 embeddings, the default GGUF has 49152 tokens
    with pytest.raises(GGUFExportError, match="49152 tokens but the model 128 embeddings"):
        export_gguf(small, None, tmp_path / "m.gguf", tokenizer_gguf=default_gguf())
    with pytest.raises(GGUFExportError, match="no tokenizer"):
        export_gguf(small, None, tmp_path / "m.gguf")
    assert files_in(tmp_path) == []


def test_unknown_tokenizer_is_refused(tmp_path):
    class Chars:  # not a BPE tokenizer llama.cpp knows
        def encode(self, text):
            return [ord(c) for c in text]

    with pytest.raises(GGUFExportError, match="pre-tokenizer"):
        export_gguf(tiny_model("llama", layers=2), Chars(), tmp_path / "m.gguf", tokenizer_gguf=False)
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--type", "q3_x"], "unknown GGUF type 'q3_x'"),
        (["--plan", "parallel=20:29"], "do not split into groups"),
        (["--dtype", "bf16"], "drop --dtype"),
    ],
)
def test_export_command_refuses_bad_input_with_one_line(tmp_path, capsys, argv, words):
    assert cli.main(["export", "--gguf", str(tmp_path / "m.gguf"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err
    assert files_in(tmp_path) == []


def test_export_command_refuses_an_existing_file_before_loading(tmp_path, capsys, monkeypatch):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    monkeypatch.setattr("truedepth.core.loading.load", lambda *a, **k: pytest.fail("loaded weights"))
    assert cli.main(["export", "--gguf", str(target)]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"


def test_export_command_refuses_a_missing_folder(tmp_path, capsys):
    assert cli.main(["export", "--gguf", str(tmp_path / "no" / "m.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real default model (integration)
# ---------------------------------------------------------------------------------------------
PROMPTS = [
    "The capital of France is",
    "It is a truth universally acknowledged, that",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def default():
    return truedepth.load("default")


@pytest.fixture(scope="module")
def sample_ids(default):
    from truedepth.measure.eval.data import held_out_text

    _, tok = default
    return tok(held_out_text()[:20000], add_special_tokens=False).input_ids


def first_disagreement(model, prompt_ids, continuation) -> tuple[int | None, float | None]:
    """Where transformers' greedy choice first differs from `continuation` (llama.cpp's greedy
    tokens, scored by teacher forcing), and the top-2 log-prob gap of transformers there."""
    ids = list(prompt_ids) + list(continuation)
    logp = torch.log_softmax(hf_logits(model, ids)[len(prompt_ids) - 1 : -1].float(), -1)
    for pos, token in enumerate(continuation):
        if int(logp[pos].argmax()) != token:
            top = logp[pos].topk(2).values
            return pos, float(top[0] - top[1])
    return None, None


def export_default(default, plan, folder):
    model, tok = default
    lp = truedepth.apply_plan(copy.deepcopy(model), plan)
    return lp, export_gguf(lp, tok, folder / "m.gguf")


@pytest.mark.integration
def test_default_model_f32_matches_transformers_and_keeps_its_gguf_tokenizer(default, sample_ids, tmp_path):
    model, path = export_default(default, "base", tmp_path)
    ids = sample_ids[:64]
    assert relative_error(gguf_logits(path, ids), hf_logits(model, ids)) < TOL
    # the tokenizer and chat template of the GGUF the default model came from, unchanged
    source, written = gguf.GGUFReader(default_gguf()).fields, gguf.GGUFReader(path).fields
    keys = [k for k in source if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys and [k for k in written if k.startswith("tokenizer.")] == keys
    for k in keys:
        assert written[k].contents() == source[k].contents(), k


@pytest.mark.integration
@pytest.mark.parametrize("plan", ["parallel=20:28", "parallel=18:27/3,skip=28"])
def test_default_lp_model_f32_matches_transformers_and_decodes_alike(default, sample_ids, tmp_path, plan):
    lp, path = export_default(default, plan, tmp_path)
    ids = sample_ids[:64]
    assert relative_error(gguf_logits(path, ids), hf_logits(lp, ids)) < TOL
    llm = open_gguf(path, n_ctx=128, f32_cache=True)
    tok = default[1]
    for prompt in PROMPTS:
        prompt_ids = tok(prompt).input_ids
        continuation = llamacpp.greedy(llm, prompt_ids, 32)
        pos, gap = first_disagreement(lp, prompt_ids, continuation)
        print(f"{plan} {prompt!r}: first disagreement {pos} (top-2 gap {gap})")
        assert pos is None or gap < NEAR_TIE, f"{prompt!r}: greedy tokens differ at {pos} (gap {gap})"
    llm.close()


@pytest.mark.integration
def test_default_model_q8_0_through_the_command_agrees_with_fp32(default, sample_ids, tmp_path, capsys):
    from truedepth.measure.eval.perplexity import perplexity

    model, tok = default
    path = tmp_path / "lp-q8.gguf"
    assert cli.main(["export", "--plan", "parallel=20:28", "--gguf", str(path), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    lp = truedepth.apply_plan(copy.deepcopy(model), "parallel=20:28")
    ids = sample_ids[:512]
    llm = open_gguf(path, n_ctx=512)  # as users run it: f16 KV cache
    got = llamacpp.logits(llm, ids)
    want = hf_logits(lp, ids).numpy()
    agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
    assert agreement >= 0.95
    q8 = perplexity(llamacpp.LlamaCppLM(llm), tok, ids, tokens=512, progress=False)
    llm.close()
    fp32 = perplexity(lp, tok, ids, tokens=512, progress=False)
    print(f"q8_0 top-1 agreement {agreement:.4f}, perplexity {q8['perplexity']:.3f} (fp32 {fp32['perplexity']:.3f})")
    assert abs(q8["nll"] - fp32["nll"]) < 0.05
