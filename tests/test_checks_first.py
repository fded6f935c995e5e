"""Bad input is reported before the expensive part: no weights are read for a plan that does not fit
the model's config.json, an unknown task or an unusable output path, and no training runs."""

from __future__ import annotations

import pytest
import transformers
from helpers.cli import assert_user_error, digest

from truedepth.apps.finetune.pipeline import prepare_output


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test."""

    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_plan_checked_against_config_before_loading(capsys, tiny4_dir, no_weights):
    assert_user_error(
        capsys,
        "eval",
        "--model",
        str(tiny4_dir),
        "--plan",
        "parallel=2:8",
        "--tokens",
        "64",
        "--window",
        "32",
        words="out of range",
    )
    assert_user_error(
        capsys, "generate", "--model", str(tiny4_dir), "--plan", "parallel=0:6", "hi", words="out of range"
    )
    assert_user_error(
        capsys,
        "finetune",
        "--model",
        str(tiny4_dir),
        "--plan",
        "parallel=2:12",
        "--out",
        str(tiny4_dir.parent / "ft"),
        words="out of range",
    )
    assert not (tiny4_dir.parent / "ft").exists()


def test_unknown_task_before_loading(capsys, tiny4_dir, no_weights):
    assert_user_error(
        capsys, "eval", "--model", str(tiny4_dir), "--tasks", "truedepth_austen_lastwrd", words="unknown lm-eval task"
    )


def test_impossible_options_first(capsys, tiny4_dir, no_weights):
    assert_user_error(capsys, "eval", "--model", str(tiny4_dir), "--limit", "5", words="--tasks")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--shape", "tiny", "--json", "{dir}"], "is a folder"),
        (["bench", "--shape", "tiny", "--plot", "{file}/b.png"], "is a file"),
        (["search", "--target-depth", "3", "--out", "{dir}"], "is a folder"),
        (["sweep", "--transforms", "parallel", "--delta", "2", "--out", "{file}"], "is a file"),
        (["finetune", "--plan", "parallel=0:2", "--out", "{file}"], "is a file"),
    ],
)
def test_output_paths_checked_before_any_work(capsys, tiny4_dir, tmp_path, no_weights, argv, words):
    (tmp_path / "f").write_text("mine")
    (tmp_path / "d").mkdir()
    argv = [a.format(dir=tmp_path / "d", file=tmp_path / "f") for a in argv]
    if argv[0] != "bench":
        argv += ["--model", str(tiny4_dir)]
    before = digest(tmp_path)
    assert_user_error(capsys, *argv, words=words)
    assert digest(tmp_path) == before


def test_finetune_refuses_a_folder_that_is_not_a_run(capsys, tiny4_dir, tmp_path, no_weights):
    (tmp_path / "config.json").write_text('{"mine": true}')
    before = digest(tmp_path)
    assert_user_error(
        capsys,
        "finetune",
        "--model",
        str(tiny4_dir),
        "--plan",
        "parallel=0:2",
        "--out",
        str(tmp_path),
        words="--overwrite",
    )
    assert digest(tmp_path) == before
    prepare_output(tmp_path, resume=False, overwrite=True)  # the user said so
    prepare_output(tmp_path / "new", resume=False, overwrite=False)  # a new folder is fine
