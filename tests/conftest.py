"""Fixtures shared by several test modules, and the `gpu` marker's skip on machines without CUDA.

Modules that tests import (tiny models, the layer-by-layer reference, CLI assertions, the vLLM and
GPU worker scripts) live in tests/helpers/.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: on a machine without it they are skipped, with the reason."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on a machine with a GPU)")
    for item in gpu_tests:
        item.add_marker(skip)


def save_tiny(folder: Path, layers: int, seed: int) -> Path:
    from helpers.tiny import char_tokenizer, tiny_model

    import truedepth

    truedepth.save(tiny_model("llama", layers=layers, seed=seed), char_tokenizer(), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved 8-layer tiny llama (seed 1) with the character tokenizer of helpers.tiny. Shared by
    the whole session: read it, copy it, never write into it."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama8") / "model", layers=8, seed=1)


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory) -> Path:
    """A saved 4-layer tiny llama (seed 0) with the character tokenizer of helpers.tiny; its parent
    folder holds nothing else. Shared by the whole session: read it, copy it, never write into it."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama4") / "model", layers=4, seed=0)


@pytest.fixture
def private_cache(request, tmp_path, monkeypatch):
    """TRUEDEPTH_CACHE in the test's own folder, so cached perplexities and texts stay in the test;
    not for tests marked `integration`: the real default model lives in the user cache."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("TRUEDEPTH_CACHE", str(tmp_path / "cache"))
