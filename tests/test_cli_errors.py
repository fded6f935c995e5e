"""User errors on the command line: exit code 2, ONE line on stderr, no traceback, nothing changed.
Bugs keep their traceback; --debug / TRUEDEPTH_DEBUG=1 show it for user errors too."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.cli import assert_user_error, digest

import truedepth
from truedepth.cli.main import main
from truedepth.utils.errors import UserError


def broken_copy(source: Path, tmp_path: Path, name: str, damage) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for p in source.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    damage(folder)
    return folder


# ---- item 3: tracebacks for user errors ---------------------------------------------------
def test_missing_model_path(capsys, tmp_path):
    assert_user_error(capsys, "generate", "--model", str(tmp_path / "nope"), "hi", words="does not exist")
    assert_user_error(capsys, "eval", "--model", "./nope", "--tokens", "64", "--window", "32", words="does not exist")


def test_truncated_safetensors(capsys, tiny4_dir, tmp_path):
    def truncate(folder):
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])

    folder = broken_copy(tiny4_dir, tmp_path, "trunc", truncate)
    before = digest(folder)
    assert_user_error(capsys, "generate", "--model", str(folder), "hi", words="safetensors")
    assert digest(folder) == before


def test_config_not_json(capsys, tiny4_dir, tmp_path):
    folder = broken_copy(tiny4_dir, tmp_path, "badcfg", lambda f: (f / "config.json").write_text("{not json"))
    assert_user_error(capsys, "generate", "--model", str(folder), "hi", words="config.json")
    assert_user_error(capsys, "plan", "parallel=0:2", "--model", str(folder), words="config.json")


@pytest.mark.parametrize(
    "plan",
    [
        '{"steps": [{"kind": "parallel"}]}',
        '{"steps": [{"kind": "parallel", "start": "a", "end": 4}]}',
        '{"steps": 3}',
        "[1, 2]",
    ],
)
def test_json_plan_missing_field_or_wrong_type(capsys, plan):
    assert_user_error(capsys, "plan", plan, "--layers", "30")


def test_device_cuda_on_a_cpu_build(capsys, tiny4_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(capsys, "generate", "--model", str(tiny4_dir), "--device", "cuda", "hi", words="cuda")
    assert_user_error(capsys, "generate", "--model", str(tiny4_dir), "--device", "gpu9", "hi", words="unknown device")


def test_finetune_out_is_a_file(capsys, tiny4_dir, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    assert_user_error(
        capsys, "finetune", "--model", str(tiny4_dir), "--plan", "parallel=0:2", "--out", str(out), words="is a file"
    )
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


def test_a_folder_without_tokenizer_names_truedepth_save(capsys, tiny4_dir, tmp_path):
    """The README's old quick start: save_pretrained alone writes no tokenizer. load says what to do,
    and truedepth.save (what the README uses now) writes a folder that reloads."""
    model, tok = truedepth.load(tiny4_dir)
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


def test_a_library_error_keeps_its_traceback(monkeypatch):
    """Only a UserError is a message for the user; an error raised inside another library (torch here) is
    not ours to explain and keeps its traceback (so does truedepth's own ValueError: test_error_policy.py)."""
    import torch

    from truedepth.cli import plan as plan_cmd

    def library_error(args):
        torch.zeros(2).view(3)  # RuntimeError raised inside torch

    monkeypatch.setattr(plan_cmd, "run", library_error)
    with pytest.raises(RuntimeError):
        main(["plan", "base", "--layers", "4"])
