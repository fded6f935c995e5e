"""A new user's mistakes with texts, model names and assets: reported at once (no network, nothing
fetched or installed at run time), with a message that names the file and the fix."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers.cli import assert_user_error

from truedepth.core.loading import resolve
from truedepth.measure.eval import data, sotu, wordnet
from truedepth.utils.errors import InputPathError, MissingAssetError, UserError


class NoDatasets:
    def __getattr__(self, name):
        raise AssertionError("the datasets hub was asked")


def test_text_folder_is_called_a_folder(tmp_path):
    with pytest.raises(InputPathError, match="is a folder"):
        data.load_text(str(tmp_path))


def test_binary_text_names_the_file(tmp_path):
    f = tmp_path / "weights.bin.txt"
    f.write_bytes(b"ok\xff\xfe\x00\x81")
    with pytest.raises(InputPathError, match=f"{f}.*not UTF-8"):
        data.load_text(str(f))


@pytest.mark.parametrize("spec", ["./nothing.txt", "~/no/such/file", "notes.md", "a/b/c"])
def test_missing_path_like_text_never_reaches_the_hub(monkeypatch, spec):
    monkeypatch.setitem(sys.modules, "datasets", NoDatasets())
    with pytest.raises(InputPathError, match="does not exist"):
        data.load_text(spec)


def test_unknown_word_offline_says_how_to_pass_a_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", NoDatasets())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE.*file path"):
        data.load_text("wikitext")


def test_missing_texts_name_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TRUEDEPTH_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    data._austen_cached.cache_clear()
    data.other_domain_text.cache_clear()
    data.fortunes_text.cache_clear()
    sotu.sotu_text.cache_clear()
    wordnet.wordnet_text.cache_clear()
    try:
        for text in ("default", "austen-train", "other-domain", "fortunes", "sotu", "wordnet", "austen-train+fortunes"):
            with pytest.raises(MissingAssetError, match="truedepth fetch-assets"):
                data.load_text(text)
    finally:
        data._austen_cached.cache_clear()
        data.other_domain_text.cache_clear()
        data.fortunes_text.cache_clear()
        sotu.sotu_text.cache_clear()
        wordnet.wordnet_text.cache_clear()


def test_fetch_never_updates_the_package_index(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package")

    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(MissingAssetError, match="sudo apt-get update.*truedepth fetch-assets"):
        data._apt_download(data.AUSTEN_PACKAGE, tmp_path)
    assert calls == [["apt-get", "download", data.AUSTEN_PACKAGE]]


@pytest.mark.parametrize(
    "name, words",
    [
        ("./missing-model", "does not exist"),
        ("/abs/missing", "does not exist"),
        ("model.safetensors", "does not exist"),
        ("defualt", "owner/name"),
        ("a b/c", "owner/name"),
    ],
)
def test_model_names_fail_fast_without_network(monkeypatch, name, words):
    monkeypatch.setattr(
        "huggingface_hub.file_download.hf_hub_download", lambda *a, **k: pytest.fail("the hub was asked")
    )
    start = time.monotonic()
    with pytest.raises(UserError, match=words):
        resolve(name)
    assert time.monotonic() - start < 5


def test_model_file_and_folder_without_config(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(InputPathError, match="is a file"):
        resolve(tmp_path / "model.bin")
    with pytest.raises(InputPathError, match="no config.json"):
        resolve(tmp_path)


def test_hub_id_offline_names_hf_hub_offline(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import (as in a user's fresh process, where it is set
    # before): without this, the hub is asked and the test waits out its network timeouts (23 s)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_user_error(capsys, "plan", "parallel=0:2", "--model", "nobody-here/no-such-model", words="HF_HUB_OFFLINE")


@pytest.mark.parametrize("layers", ["0", "-3"])
def test_plan_layers_must_be_positive(capsys, layers):
    assert_user_error(capsys, "plan", "parallel=0:2", "--layers", layers, words="--layers")


def test_text_errors_on_the_command_line(capsys, tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    assert_user_error(capsys, "eval", "--text", str(tmp_path), "--tokens", "64", "--window", "32", words="folder")
    assert_user_error(
        capsys, "eval", "--text", str(tmp_path / "bin.txt"), "--tokens", "64", "--window", "32", words="not UTF-8"
    )


# ---- found by trying the CLI as a new user (each used to run for minutes, or end in a traceback) ----
@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "notjson.txt").write_text("hello")
    return tmp_path


@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", "--model", "{m}", "--window", "100000", "--tokens", "200000"], "256 positions"),  # ran 4 minutes
        (["eval", "--model", "{m}", "--text", "", "--tokens", "64", "--window", "32"], "text spec is empty"),
        (["eval", "--model", "", "--tokens", "64", "--window", "32"], "model name is empty"),
        (["generate", "--model", "{m}", "hi", "--sample", "--temperature", "-1"], "--temperature"),
        (["generate", "--model", "{m}", "hi", "--sample", "--top-k", "-3"], "--top-k"),
        (["generate", "--model", "{m}", "hi", "--sample", "--top-p", "2"], "--top-p"),  # was silently accepted
        (["generate", "--model", "{m}", "hi", "--chat"], "no chat template"),
        (["sweep", "--model", "{m}", "--bench", "{d}/notjson.txt", "--out", "{d}/sw"], "not the JSON"),
        (["finetune", "--model", "{m}", "--plan", "parallel=0:2", "--threads", "0", "--out", "{d}/ft"], "--threads"),
        (["search", "--model", "{m}", "--target-depth", "3", "--threads", "0"], "--threads"),
    ],
)
def test_new_user_mistakes(capsys, tiny4_dir, workdir, argv, words):
    argv = [a.format(m=tiny4_dir, d=workdir) for a in argv]
    capsys.readouterr()  # the model's save (a session fixture) is not the command's output
    assert_user_error(capsys, *argv, words=words)
    assert not (workdir / "ft").exists() and not (workdir / "sw" / "results.jsonl").exists()


def test_fetch_assets_is_a_no_op_when_everything_is_there(capsys, monkeypatch):
    """`truedepth fetch-assets` (what a missing-asset error names) fetches only what is missing."""
    from truedepth.cli.main import main

    data.fetch_texts()  # set-up state: the texts are in the cache (make setup fetched them)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert main(["fetch-assets", "--texts-only"]) == 0
    printed = capsys.readouterr().out.split()
    assert {
        str(data._other_path()),
        str(data._fortunes_path()),
        str(sotu.sotu_path()),
        str(wordnet.wordnet_path()),
    } <= set(printed)
    assert len(printed) == len(data.AUSTEN_NOVELS) + 4
