"""Fidelity to a reference model (truedepth.measure.eval.fidelity) and `truedepth eval --against`: top-1
agreement, KL divergence and perplexities against a direct computation, MMLU-chat letters, and bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers.cli import assert_user_error
from helpers.tiny import char_tokenizer, tiny_model

import truedepth
from truedepth import cli
from truedepth.measure.eval import fidelity as fid
from truedepth.measure.eval.perplexity import perplexity

TEXT = "It was a truth universally acknowledged, that a tiny model in want of a test must be compared.\n" * 6


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (101,)).tolist()


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", layers=6, seed=3)


@pytest.fixture(scope="module")
def lp():
    """The same model with layers 1..4 run in parallel pairs: close to `base`, not equal."""
    return truedepth.apply_plan(tiny_model("llama", layers=6, seed=3), "parallel=1:5")


def direct(reference, model, ids, window, stride):
    """From the definitions, window by window and one position at a time, in float64: agreeing arg-maxes,
    mean KL(reference || model), and both mean NLLs, over the positions perplexity scores."""
    agree, kl, ref_nll, nll, count, prev_end, begin = 0, 0.0, 0.0, 0.0, 0, 0, 0
    while begin + window <= len(ids):
        end = begin + window
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            p = torch.log_softmax(reference(x).logits[0].double(), -1)
            q = torch.log_softmax(model(x).logits[0].double(), -1)
        for pos in range(max(begin + 1, prev_end), end):  # tokens no earlier window scored
            i = pos - begin - 1
            agree += int(p[i].argmax() == q[i].argmax())
            kl += float((p[i].exp() * (p[i] - q[i])).sum())
            ref_nll -= float(p[i, ids[pos]])
            nll -= float(q[i, ids[pos]])
            count += 1
        prev_end, begin = end, begin + stride
    return {"agree": agree, "kl": kl / count, "ref_nll": ref_nll / count, "nll": nll / count, "count": count}


@pytest.mark.parametrize("window,stride,batch_size", [(16, None, 1), (16, 5, 3), (7, 6, 2), (32, None, 4)])
def test_metrics_match_definition(base, lp, ids, window, stride, batch_size):
    got = fid.fidelity(
        base, lp, None, ids, tokens=None, window=window, stride=stride, batch_size=batch_size, progress=False
    )
    want = direct(base, lp, ids, window, stride or window)
    assert got["tokens"] == want["count"]
    assert got["top1_agreement"] == want["agree"] / want["count"]
    assert 0 < got["top1_agreement"] < 1  # the two models differ, but not everywhere
    assert got["kl"] == pytest.approx(want["kl"], abs=1e-6) and got["kl"] > 1e-3
    assert got["nll"] == pytest.approx(want["nll"], abs=1e-6)
    assert got["reference_nll"] == pytest.approx(want["ref_nll"], abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(want["nll"]), rel=1e-6)
    # the model's perplexity is the one `perplexity` gives on the same windows
    ppl = perplexity(lp, None, ids, tokens=None, window=window, stride=stride, progress=False)
    assert got["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-6)
    assert {k: got[k] for k in ("tokens", "windows", "window", "stride", "used_tokens")} == {
        k: ppl[k] for k in ("tokens", "windows", "window", "stride", "used_tokens")
    }


def test_identical_models_agree_everywhere_with_zero_kl(base, ids):
    twin = tiny_model("llama", layers=6, seed=3)
    for other in (base, twin):
        got = fid.fidelity(base, other, None, ids, tokens=96, window=32, progress=False)
        assert got["top1_agreement"] == 1.0 and got["kl"] == 0.0
        assert got["perplexity"] == got["reference_perplexity"]


def test_kl_is_from_the_reference(base, lp, ids):
    """KL is not symmetric: swapping the models gives KL(model || reference), which differs."""
    there = fid.fidelity(base, lp, None, ids, tokens=None, window=32, progress=False)
    back = fid.fidelity(lp, base, None, ids, tokens=None, window=32, progress=False)
    assert there["top1_agreement"] == back["top1_agreement"]
    assert there["kl"] != pytest.approx(back["kl"], rel=1e-3)
    assert there["perplexity"] == back["reference_perplexity"]


# ------------------------------------------------------------------------------------------
# MMLU-chat
# ------------------------------------------------------------------------------------------
CHOICES = ["cytoplasm", "the nucleus", "mitochondria", "ribosomes"]


@pytest.mark.parametrize(
    "answer,letter",
    [
        ("A", "A"),
        ("B.", "B"),
        ("C. mitochondria", "C"),
        ("(D)", "D"),
        ("B) the nucleus", "B"),
        ("**C**: mitochondria", "C"),
        ("  D", "D"),
        ("The answer is B", "B"),
        ("Answer: C", "C"),
        ("Option (A) is right", "A"),
        ("I think it is D.", "D"),
        ("Mitochondria.", "C"),  # no letter: the choice the answer starts with
        ("A cell has many parts", None),  # the article, not a choice
        ("the answer is a cell", None),
        ("ABC", None),
        ("", None),
    ],
)
def test_letter_parsing(answer, letter):
    assert fid.parse_choice(answer, CHOICES) == letter


def test_questions_are_fixed_by_the_seed_and_prompts_ask_for_a_letter():
    first = fid.mmlu_chat_questions(5)
    assert first == fid.mmlu_chat_questions(5) and fid.mmlu_chat_questions(8)[:5] != [] and len(first) == 5
    assert all(set(d) >= {"question", "choices", "answer", "subject"} and len(d["choices"]) == 4 for d in first)
    tok = char_tokenizer()
    plain = fid.mmlu_chat_prompt(tok, first[0])
    assert first[0]["question"].strip() in plain and "\nD. " in plain and plain.endswith("Answer:")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    chat = fid.mmlu_chat_prompt(tok, first[0])
    assert chat.startswith("<user>The following is a multiple choice question") and chat.endswith("<assistant>")
    with pytest.raises(ValueError, match="between 1 and"):
        fid.mmlu_chat_questions(0)


def test_agreement_accuracy_and_unparsed_are_counted_per_question(monkeypatch):
    docs = fid.mmlu_chat_questions(4)
    keys = ["ABCD"[d["answer"]] for d in docs]
    answers = {
        "reference": [keys[0], "B", "C", "no idea"],
        "model": [f"{keys[0]}.", "B", "D", "no idea"],
    }
    monkeypatch.setattr(fid, "greedy_answers", lambda m, tok, prompts, *a, **k: answers[m])
    got = fid.mmlu_chat_agreement("reference", "model", char_tokenizer(), 4, progress=False)
    assert got["questions"] == 4 and got["agreement"] == 2 / 4  # questions 1 and 2; two unparsed never agree
    assert got["unparsed"] == 1 and got["reference_unparsed"] == 1 and got["identical"] == 2 / 4
    want = lambda picks: sum(p == k for p, k in zip(picks, keys)) / 4  # noqa: E731
    assert got["accuracy"] == want([keys[0], "B", "D", None])
    assert got["reference_accuracy"] == want([keys[0], "B", "C", None])
    assert got["letters"]["model"]["B"] == 1 + (keys[0] == "B") and sum(got["letters"]["reference"].values()) == 3
    model_picks, ref_picks = [keys[0], "B", "D"], [keys[0], "B", "C"]
    chance = sum(model_picks.count(k) * ref_picks.count(k) for k in "ABCD") / 16
    assert got["chance_agreement"] == pytest.approx(chance)


def test_batched_greedy_answers_are_each_prompts_own(base):
    tok = char_tokenizer()
    prompts = ["Q: 2+2?\nAnswer:", "Which one?", "A much longer question, with choices A, B, C and D.\nAnswer:"]
    batched = fid.greedy_answers(base, tok, prompts, new_tokens=5, batch_size=3, progress=False)
    for prompt, answer in zip(prompts, batched):
        x = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = base.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=5, pad_token_id=0)
        assert answer == tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------
# `truedepth eval --against`
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def eval_args(tiny_dir, text_path, *extra):
    return ["eval", "--model", str(tiny_dir), "--text", str(text_path), "--tokens", "256", "--window", "32"] + [
        *extra,
        "--no-progress",
    ]


def test_eval_against_base_writes_the_fidelity_fields(tiny_dir, text_path, capsys):
    code = cli.main(eval_args(tiny_dir, text_path, "--plan", "parallel=2:6", "--against", "base", "--json"))
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["against"] == "base" and result["plan"] == "parallel=2:6"
    reference, tok = truedepth.load(tiny_dir)
    model, _ = truedepth.load(tiny_dir, plan="parallel=2:6")
    want = fid.fidelity(reference, model, tok, TEXT, tokens=256, window=32, progress=False)
    for key in ("top1_agreement", "kl", "reference_perplexity", "reference_nll"):
        assert result["fidelity"][key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)
    assert result["perplexity"] == pytest.approx(want["perplexity"], rel=1e-9) and result["tokens"] == want["tokens"]
    assert result["fidelity"]["reference_perplexity"] == pytest.approx(
        perplexity(reference, tok, TEXT, tokens=256, window=32, progress=False)["perplexity"], rel=1e-6
    )
    # a plan as the reference; the table names the metrics
    code = cli.main(eval_args(tiny_dir, text_path, "--plan", "parallel=2:6", "--against", "parallel=4:6"))
    out = capsys.readouterr().out
    assert code == 0 and "top-1 agreement" in out and "KL(reference || model)" in out and "parallel=4:6" in out


def test_eval_against_another_folder_with_mmlu_chat(tiny_dir, text_path, tmp_path, capsys):
    other = tmp_path / "other"
    truedepth.save(tiny_model("llama", layers=8, seed=1), char_tokenizer(), other)  # tiny_dir's weights again
    code = cli.main(eval_args(tiny_dir, text_path, "--against", str(other), "--mmlu-chat", "2", "--json"))
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["fidelity"]["top1_agreement"] == 1.0 and result["fidelity"]["kl"] == 0.0
    chat = result["mmlu_chat"]
    assert chat["questions"] == 2 and chat["identical"] == 1.0 and chat["prompt"] == "plain (no chat template)"
    assert chat["agreement"] == (2 - chat["unparsed"]) / 2 and chat["accuracy"] == chat["reference_accuracy"]


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--against", "base"], "no --plan is given"),
        (["--plan", "parallel=2:6", "--against", "/no/such/model"], "does not exist"),
        (["--plan", "parallel=2:6", "--against", "parallel=2:99"], "99"),
        (["--plan", "parallel=2:6", "--against", "not a model"], "not a folder here"),
        (["--plan", "parallel=2:6", "--against", ""], "--against is empty"),
        (["--mmlu-chat", "3"], "add --against"),
        (["--plan", "parallel=2:6", "--against", "base", "--mmlu-chat", "-1"], "--mmlu-chat"),
    ],
)
def test_bad_against_is_refused_before_loading(tiny_dir, text_path, monkeypatch, capsys, extra, words):
    from truedepth.core import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert_user_error(capsys, *eval_args(tiny_dir, text_path, *extra), words=words)


def test_reference_with_another_vocabulary_is_refused(tiny_dir, text_path, tmp_path, monkeypatch, capsys):
    from truedepth.core import loading

    other = tmp_path / "wide-vocab"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"vocab_size": 2 * config["vocab_size"]}))
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert_user_error(capsys, *eval_args(tiny_dir, text_path, "--against", str(other)), words="share a tokenizer")
