"""Helpers shared by the offline text sources: cached files, missing-asset errors, overlap checks."""

from __future__ import annotations

import re
from pathlib import Path

from ...utils.errors import MissingAssetError


def _read_cached(path: Path) -> str:
    """Read a cached text file exactly as written (no newline translation)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _word_ngrams(text: str, n: int = 8) -> set[str]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _missing(what: str, where: Path) -> MissingAssetError:
    return MissingAssetError(f"{what} are not in {where}: they are fetched once at set-up; run "
                             "`truedepth fetch-assets` (or `make setup`).")
