"""The `truedepth demo` command and its decode-speed helper (truedepth.measure.bench.speed)."""

import argparse
import json

import pytest
import torch
from helpers.tiny import tiny_model
from test_perplexity import TEXT, char_tokenizer

from truedepth import cli
from truedepth.apps import demo as demo_app
from truedepth.cli import demo
from truedepth.measure.bench.speed import decode_tokens_per_second, prompt_ids
from truedepth.utils.env import describe_machine, machine_info
from truedepth.utils.options import from_args


def demo_args(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return from_args(demo_app.DemoOptions, parser.parse_args(list(argv)))


def test_decode_speed_generates_every_token_even_past_eos():
    model, tok = tiny_model("llama", layers=2), char_tokenizer()
    ids = prompt_ids(tok, 8)
    assert ids.shape == (1, 8)
    first = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # plain greedy generation would stop after one token
    calls = []
    original = model.generate

    def generate(*a, **kw):
        out = original(*a, **kw)
        calls.append(out.shape[1] - ids.shape[1])
        return out

    model.generate = generate
    rate = decode_tokens_per_second(model, tok, prompt_tokens=8, new_tokens=6, repeats=3)
    assert rate > 0
    assert calls[1:] == [6, 6, 6]  # after the warm-up, each timed run made all 6 tokens


def test_settings_quick_and_defaults():
    s = demo_app.settings(demo_args())
    assert [str(p) for p in s["plans"]] == ["base", *demo_app.DEFAULT_PLANS]
    assert str(s["sample_plan"]) == demo_app.DEFAULT_PLANS[0] and s["tokens"] == 4096
    quick = demo_app.settings(demo_args("--quick", "--plan", "parallel=2:6", "--plan", "parallel=2:4"))
    assert [str(p) for p in quick["plans"]] == ["base", "parallel=2:6"]
    assert quick["tokens"] == demo_app.QUICK["tokens"] and quick["repeats"] == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--plan", "parallel=2"], "parallel"),
        (["--window", "1"], "window must be an integer of at least 2"),
        (["--tokens", "100", "--window", "512"], "tokens (100) must be at least one window (512)"),
        (["--new-tokens", "0"], "--new-tokens must be at least 1"),
    ],
)
def test_bad_settings_fail_before_loading(argv, message, capsys):
    assert cli.main(["demo", "--model", "/no/such/model", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("truedepth demo: error:") and message in err


def test_plan_that_does_not_fit_fails_before_measuring(tmp_path, capsys):
    folder = saved_tiny(tmp_path)
    assert (
        cli.main(
            ["demo", "--model", str(folder), "--text", str(tmp_path / "text.txt"), "--plan", "parallel=4:12", "--quick"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "parallel=4:12" in err and "out of range" in err


def saved_tiny(tmp_path):
    folder = tmp_path / "model"
    tiny_model("llama", layers=8).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


def test_demo_runs_on_a_tiny_model(tmp_path, capsys):
    folder = saved_tiny(tmp_path)
    argv = [
        "demo",
        "--model",
        str(folder),
        "--text",
        str(tmp_path / "text.txt"),
        "--tokens",
        "128",
        "--window",
        "64",
        "--new-tokens",
        "3",
        "--repeats",
        "1",
        "--sample-tokens",
        "4",
        "--prompt",
        "Hi",
        "--plan",
        "parallel=2:6",
        "--plan",
        "parallel=0:8/4",
        "--json",
    ]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [r["plan"] for r in rows] == ["base", "parallel=2:6", "parallel=0:8/4"]
    assert [r["depth"] for r in rows] == [8, 6, 2]
    assert rows[0]["perplexity_ratio"] == rows[0]["speed_ratio"] == 1.0
    assert rows[1]["perplexity_ratio"] == pytest.approx(rows[1]["perplexity"] / rows[0]["perplexity"])
    assert all(r["tokens"] == 126 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert list(result["samples"]) == ["base", "parallel=2:6"]
    for key in ("cpu", "cores", "torch", "transformers", "device", "dtype", "date"):
        assert key in result["machine"]
    report = demo_app.format_report(result)
    assert "parallel=0:8/4" in report and "Measured on:" in report and "A (parallel=2:6):" in report


def test_table_columns_line_up():
    rows = [
        {
            "plan": "base",
            "depth": 30,
            "perplexity": 38.7,
            "perplexity_ratio": 1.0,
            "decode_tokens_per_s": 20.0,
            "speed_ratio": 1.0,
        },
        {
            "plan": "parallel=12:28",
            "depth": 22,
            "perplexity": 64.0,
            "perplexity_ratio": 1.654,
            "decode_tokens_per_s": 21.5,
            "speed_ratio": 1.075,
        },
    ]
    lines = demo_app.format_rows(rows).splitlines()
    assert len({len(line) for line in lines}) == 1  # every line the same width
    assert lines[3].split() == ["parallel=12:28", "22", "64.00", "1.654x", "21.5", "1.07x"]


def test_machine_description_names_hardware_and_versions():
    info = machine_info("cpu", "float32")
    text = describe_machine(info)
    assert info["cpu"] in text and f"{info['cores']} cores" in text and torch.__version__ in text
    assert "float32" in text and info["date"] in text


@pytest.mark.integration
def test_demo_quick_on_default_model(capsys):
    assert cli.main(["demo", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and demo_app.DEFAULT_PLANS[0] in out
    assert "Measured on:" in out and f"A ({demo_app.DEFAULT_PLANS[0]}):" in out
    table = out.split("\n\n")[1].splitlines()
    assert table[2].split()[:2] == ["base", "30"] and table[3].split()[:2] == [demo_app.DEFAULT_PLANS[0], "26"]
