"""User errors on the command line: exit code 2, ONE line on stderr, no traceback, nothing changed.
Bugs keep their traceback; --debug / TRUEDEPTH_DEBUG=1 show it for user errors too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import truedepth
from tiny import char_tokenizer, tiny_model
from truedepth.cli.main import main
from truedepth.utils.errors import UserError


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_user_error(capsys, *argv: str, words: str = "") -> str:
    code, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"truedepth {argv[0]}: error: "), err
    assert words.lower() in lines[0].lower(), err
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    truedepth.save(tiny_model("llama", layers=4), char_tokenizer(), folder)
    return folder


def broken_copy(saved: Path, tmp_path: Path, name: str, damage) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for p in saved.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    damage(folder)
    return folder


# ---- item 3: tracebacks for user errors ---------------------------------------------------
def test_missing_model_path(capsys, tmp_path):
    assert_user_error(capsys, "generate", "--model", str(tmp_path / "nope"), "hi", words="does not exist")
    assert_user_error(capsys, "eval", "--model", "./nope", "--tokens", "64", "--window", "32", words="does not exist")


def test_truncated_safetensors(capsys, saved, tmp_path):
    def truncate(folder):
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    folder = broken_copy(saved, tmp_path, "trunc", truncate)
    before = digest(folder)
    assert_user_error(capsys, "generate", "--model", str(folder), "hi", words="safetensors")
    assert digest(folder) == before


def test_config_not_json(capsys, saved, tmp_path):
    folder = broken_copy(saved, tmp_path, "badcfg", lambda f: (f / "config.json").write_text("{not json"))
    assert_user_error(capsys, "generate", "--model", str(folder), "hi", words="config.json")
    assert_user_error(capsys, "plan", "parallel=0:2", "--model", str(folder), words="config.json")


@pytest.mark.parametrize("plan", ['{"steps": [{"kind": "parallel"}]}', '{"steps": [{"kind": "parallel", "start": "a", "end": 4}]}',
                                  '{"steps": 3}', '[1, 2]'])
def test_json_plan_missing_field_or_wrong_type(capsys, plan):
    assert_user_error(capsys, "plan", plan, "--layers", "30")


def test_device_cuda_on_a_cpu_build(capsys, saved):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(capsys, "generate", "--model", str(saved), "--device", "cuda", "hi", words="cuda")
    assert_user_error(capsys, "generate", "--model", str(saved), "--device", "gpu9", "hi", words="unknown device")


def test_finetune_out_is_a_file(capsys, saved, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    assert_user_error(capsys, "finetune", "--model", str(saved), "--plan", "parallel=0:2", "--out", str(out),
                      words="is a file")
    assert out.read_text() == "mine"


def test_debug_shows_the_traceback(capsys, monkeypatch):
    with pytest.raises(UserError):
        main(["plan", "parallel=0:40", "--layers", "30", "--debug"])
    monkeypatch.setenv("TRUEDEPTH_DEBUG", "1")
    with pytest.raises(UserError):
        main(["plan", "parallel=0:40", "--layers", "30"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    """An exception that is not a user error (here: a KeyError inside the command) is not hidden."""
    from truedepth.cli import plan as plan_cmd

    def broken(args):
        raise KeyError("internal")
    monkeypatch.setattr(plan_cmd, "run", broken)
    with pytest.raises(KeyError):
        main(["plan", "base", "--layers", "4"])


def test_a_folder_without_tokenizer_names_truedepth_save(capsys, saved, tmp_path):
    """The README's old quick start: save_pretrained alone writes no tokenizer. load says what to do,
    and truedepth.save (what the README uses now) writes a folder that reloads."""
    model, tok = truedepth.load(saved)
    model.save_pretrained(tmp_path / "no-tok")
    with pytest.raises(UserError, match=r"no tokenizer; save models with truedepth.save\(model, tokenizer"):
        truedepth.load(tmp_path / "no-tok")
    capsys.readouterr()
    assert_user_error(capsys, "generate", "--model", str(tmp_path / "no-tok"), "hi", words="truedepth.save")
    truedepth.save(model, tok, tmp_path / "no-tok")
    again, tok2 = truedepth.load(tmp_path / "no-tok")
    assert tok2("abc").input_ids == tok("abc").input_ids
    import torch
    ids = torch.tensor([tok("abc").input_ids])
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_only_our_own_value_errors_are_user_errors(monkeypatch):
    """A ValueError raised by truedepth's code is a message for the user; one raised inside another
    library (torch here) is not ours to explain and keeps its traceback."""
    import torch

    from truedepth.cli import plan as plan_cmd

    def library_error(args):
        torch.zeros(2).view(3)  # RuntimeError raised inside torch
    monkeypatch.setattr(plan_cmd, "run", library_error)
    with pytest.raises(RuntimeError):
        main(["plan", "base", "--layers", "4"])
