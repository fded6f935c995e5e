"""Where llama.cpp's own programs (llama-server, llama-bench, ...) are: the user cache, then PATH.

`python -m truedepth.deploy.llamacpp.build` (`make llama-programs`) builds them once per
llama-cpp-python version into ``<cache>/llama.cpp/<version>/bin`` (cache: `truedepth.utils.env.cache_dir`),
from the llama.cpp source that version vendors, so the programs and the library the tests load are
the same llama.cpp. Everything in truedepth that runs one asks `find_program` for its path.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

from ...utils.env import cache_dir
from ...utils.errors import UserError

# The pin of requirements-dev.txt (tests/test_llamacpp_programs.py checks they agree): the version
# built when llama-cpp-python is not installed.
PINNED_VERSION = "0.3.36"
# What `build` compiles: plain completion (llama-completion; llama-cli is the chat program in this
# version), the OpenAI-compatible server, and the speed, perplexity and quantization tools.
PROGRAMS = ("llama-cli", "llama-completion", "llama-server", "llama-bench", "llama-perplexity", "llama-quantize")
BUILD_HINT = "make llama-programs (or: python -m truedepth.deploy.llamacpp.build; about 5-20 min on 2 cores, once)"


class MissingProgramError(UserError):
    """A llama.cpp program that is neither built in the user cache nor on PATH."""


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (the programs must match the library), else the pin."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return PINNED_VERSION


def build_root() -> Path:
    """The folder holding one sub-folder per built version (and the build locks and logs), created."""
    root = cache_dir() / "llama.cpp"
    root.mkdir(exist_ok=True)
    return root


def version_dir(version: str | None = None) -> Path:
    return build_root() / (version or llama_cpp_version())


def programs_dir(version: str | None = None) -> Path:
    return version_dir(version) / "bin"


def is_built(version: str | None = None) -> bool:
    """Every program of PROGRAMS is in the cache for `version` (the folder appears only complete)."""
    folder = programs_dir(version)
    return all(os.access(folder / name, os.X_OK) for name in PROGRAMS)


def find_program(name: str) -> Path:
    """The path of llama.cpp's program `name` (e.g. "llama-server"): the one built for the installed
    llama-cpp-python version in the user cache, else the first on PATH; a MissingProgramError
    (one line, saying how to build it) if neither has it."""
    cached = programs_dir() / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    found = shutil.which(name)
    if found:
        return Path(found)
    raise MissingProgramError(
        f"llama.cpp's {name} is not built (looked in {programs_dir()} and on PATH); build it with {BUILD_HINT}."
    )
