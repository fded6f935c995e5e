"""Helpers shared by the offline text sources: cached files, missing-asset errors, overlap checks."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

from ...utils.errors import MissingAssetError


def read_cached(path: Path) -> str:
    """Read a cached text file exactly as written (no newline translation)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def word_ngrams(text: str, n: int = 8) -> set[str]:
    """Every run of ``n`` consecutive lowercased words of ``text``: training texts sharing one with a
    measuring text are dropped, so the measurement never scores text the model trained on."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def shuffled_apart_from(entries: Iterable[str], other: str, sep: str) -> str:
    """The `entries` that share no run of eight words with `other`, shuffled (seed 0) and joined by `sep`:
    a training text that the other-domain measurement never scores."""
    banned = word_ngrams(other)
    kept = [entry for entry in entries if not word_ngrams(entry) & banned]
    random.Random(0).shuffle(kept)
    return sep.join(kept)


def missing_asset(what: str, where: Path) -> MissingAssetError:
    """The error for a text that set-up did not fetch: it names the command that fetches it."""
    return MissingAssetError(
        f"{what} are not in {where}: they are fetched once at set-up; run `truedepth fetch-assets` (or `make setup`)."
    )


def read_fetched(path: Path, what: str) -> str:
    """A text that set-up fetched into the cache, or the error that names the command fetching it."""
    if not path.is_file():
        raise missing_asset(what, path.parent)
    return read_cached(path)
