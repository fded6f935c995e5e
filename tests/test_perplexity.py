"""Perplexity (truedepth.measure.eval.perplexity) and the `truedepth eval` command."""

import json
import math
import sys
import types

import pytest
import torch
from helpers.tiny import tiny_model

import truedepth
from truedepth import cli
from truedepth.measure.eval.perplexity import make_windows, perplexity, tokenize


def char_tokenizer():
    """A character-level fast tokenizer (99 ids) that fits the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


TEXT = (
    "It was a truth universally acknowledged, that a tiny model in want of a test must be scored on some text.\n"
) * 4


def reference_perplexity(model, ids, window, stride):
    """Straight from the definition: a loop over windows, one token at a time, in float64."""
    nll, count, prev_end, begin = 0.0, 0, 0, 0
    while begin + window <= len(ids):
        end = begin + window
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for pos in range(max(begin + 1, prev_end), end):  # tokens no earlier window scored
            nll -= logp[pos - begin - 1, ids[pos]].item()
            count += 1
        prev_end, begin = end, begin + stride
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=4)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (101,)).tolist()


@pytest.mark.parametrize(
    "window,stride,batch_size", [(16, None, 4), (16, None, None), (16, 5, 3), (16, 1, 8), (7, 6, 2)]
)
def test_matches_definition(model, ids, window, stride, batch_size):
    got = perplexity(model, None, ids, tokens=None, window=window, stride=stride, batch_size=batch_size, progress=False)
    want, count = reference_perplexity(model, ids, window, stride or window)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(want, rel=1e-6)
    assert got["nll"] == pytest.approx(math.log(want), rel=1e-6)
    assert got["stride"] == (stride or window) and got["window"] == window


def test_window_counts(ids):
    disjoint = make_windows(ids, 100, 16)
    assert disjoint.ids.shape == (6, 16) and disjoint.scored == (15,) * 6 and disjoint.used_tokens == 96
    assert torch.equal(disjoint.ids[1], torch.tensor(ids[16:32]))
    sliding = make_windows(ids, 40, 16, 8)  # windows at 0, 8, 16, 24
    assert sliding.ids.shape == (4, 16) and sliding.scored == (15, 8, 8, 8) and sliding.used_tokens == 40


def test_transformed_model_matches_definition(ids):
    lp = truedepth.apply_plan(tiny_model("qwen3", layers=6), "parallel=1:5")
    got = perplexity(lp, None, ids, tokens=64, window=32, stride=8, progress=False)
    want, _ = reference_perplexity(lp, ids[:64], 32, 8)
    assert got["perplexity"] == pytest.approx(want, rel=1e-6)


def test_text_is_tokenised_once_and_truncated(model):
    tok = char_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    from_text = perplexity(model, tok, TEXT, tokens=200, window=50, progress=False)
    from_ids = perplexity(model, None, ids[:200], tokens=None, window=50, progress=False)
    assert from_text == from_ids
    assert from_text["used_tokens"] == 200 and from_text["windows"] == 4
    assert tokenize(tok, TEXT, 10) == ids[: len(tokenize(tok, TEXT, 10))]  # prefix tokenisation agrees
    # more tokens asked than the text has: all of it is used
    assert perplexity(model, tok, TEXT, tokens=10_000, window=50, progress=False)["used_tokens"] == len(ids) // 50 * 50


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(window=0), "window must be an integer of at least 2"),
        (dict(window=16, stride=17), "stride must be between 1 and the window (16)"),
        (dict(window=16, stride=0), "stride must be between 1 and the window"),
        (dict(window=16, tokens=8), "tokens (8) must be at least one window (16)"),
        (dict(window=200, tokens=None), "the text has only 101 tokens, fewer than one window of 200"),
        (dict(window=16, batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_bad_settings_are_refused(model, ids, kwargs, message):
    with pytest.raises(ValueError) as err:
        perplexity(model, None, ids, progress=False, **kwargs)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------
# The `eval` command
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama with a character tokenizer saved as a folder, and a text file."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", layers=8).save_pretrained(folder / "model")
    char_tokenizer().save_pretrained(folder / "model")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json(saved, capsys):
    argv = [
        "eval",
        "--model",
        str(saved / "model"),
        "--plan",
        "parallel=2:6",
        "--text",
        str(saved / "text.txt"),
        "--tokens",
        "300",
        "--window",
        "64",
        "--json",
        "--no-progress",
    ]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    result = json.loads(out)
    for key in ("perplexity", "tokens", "depth", "plan", "model", "window", "stride", "original_depth", "seconds"):
        assert key in result
    assert result["depth"] == 6 and result["original_depth"] == 8 and result["plan"] == "parallel=2:6"
    assert result["window"] == result["stride"] == 64 and result["tokens"] == 4 * 63
    # the number is the one the Python API gives for the same model and text
    model, tok = truedepth.load(saved / "model", plan="parallel=2:6")
    direct = perplexity(model, tok, TEXT, tokens=300, window=64, progress=False)
    assert result["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-9)


def test_eval_table_and_stride(saved, capsys):
    argv = [
        "eval",
        "--model",
        str(saved / "model"),
        "--text",
        str(saved / "text.txt"),
        "--tokens",
        "128",
        "--window",
        "64",
        "--stride",
        "32",
        "--no-progress",
    ]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
    assert "perplexity" in out and "sliding, stride 32" in out
    assert lines["plan"].strip() == "base" and lines["depth"].startswith("8 (original 8)")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--window", "0"], "window must be an integer of at least 2"),
        (["--window", "64", "--stride", "65"], "stride must be between 1 and the window (64)"),
        (["--tokens", "10", "--window", "64"], "tokens (10) must be at least one window (64)"),
        (["--text", "/no/such/file.txt"], "does not exist"),
    ],
)
def test_eval_rejects_bad_input_before_loading(extra, message, capsys):
    # the model folder does not exist either: the argument error must come first
    code, _, err = run_cli(["eval", "--model", "/no/such/model", *extra], capsys)
    assert code == 2
    assert err.startswith("truedepth eval: error:") and message in err


def test_eval_rejects_text_shorter_than_a_window(saved, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    code, _, err = run_cli(["eval", "--model", str(saved / "model"), "--text", str(short), "--window", "64"], capsys)
    assert code == 2
    assert "the text has only 10 tokens, fewer than one window of 64" in err and "smaller --window" in err


def test_eval_tasks_only_skips_perplexity(saved, capsys, monkeypatch):
    calls = []

    def evaluate_tasks(model, tokenizer, tasks, num_fewshot=None, limit=None):
        calls.append((tasks, num_fewshot, limit))
        return {
            "fake": {"acc": 0.5, "acc_stderr": 0.1, "n_samples": 3},
            "other": {"exact_match": 0.25},
            "fake_subtask": {"acc": 1.0},
        }

    monkeypatch.setitem(
        sys.modules,
        "truedepth.measure.eval.icl",
        types.SimpleNamespace(
            evaluate_tasks=evaluate_tasks, task_manager=lambda tasks: None, check_tasks=lambda tasks, manager: None
        ),
    )
    argv = [
        "eval",
        "--model",
        str(saved / "model"),
        "--tasks",
        "fake, other",
        "--num-fewshot",
        "2",
        "--limit",
        "3",
        "--json",
    ]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    result = json.loads(out)
    assert calls == [(["fake", "other"], 2, 3)]
    assert result["tasks"]["fake"]["acc"] == 0.5 and "fake_subtask" in result["tasks"]
    assert "perplexity" not in result
    # with --text as well, both are run; the table shows the task rows
    code, out, _ = run_cli(
        argv[:-1] + ["--text", str(saved / "text.txt"), "--tokens", "64", "--window", "64", "--no-progress"], capsys
    )
    assert code == 0 and "perplexity" in out
    assert "acc 0.5000 ± 0.1000 (n=3)" in out and "exact_match 0.2500" in out and "fake_subtask" not in out


@pytest.mark.integration
def test_prefix_tokenisation_matches_whole_text_on_real_tokenizer():
    from transformers import AutoTokenizer

    from truedepth.core.loading import resolve
    from truedepth.measure.eval.data import held_out_text

    tok = AutoTokenizer.from_pretrained(resolve("default"))
    text = held_out_text()[:200_000]
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert tokenize(tok, text, 2000)[:2000] == whole[:2000]
