"""General knowledge for training: the glosses of WordNet 3.0 (Debian package ``wordnet-base``).

One line per synset, ``words (part of speech): definition; "examples"``, e.g.
``scorch, singe (noun): a surface burn``: some 117,000 short definitions of every field of
English vocabulary (plants, law, chemistry, sport, ...): breadth of knowledge that the novels lack.
As 30 % of the fine-tuning text it moved the other domain by -0.8 % at equal tokens
(docs/COMPRESS.md), so it is an option, not the default. WordNet licence (Princeton University):
use, copying and distribution permitted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path

from ...utils.env import cache_dir
from .textfiles import read_fetched, shuffled_apart_from

WORDNET_PACKAGE = "wordnet-base"
WORDNET_DIR = "usr/share/wordnet"
_PARTS_OF_SPEECH = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
# Adjective position markers after a word ("(a)ttributive", "(p)redicative", "(ip)"): not text.
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


def _synset_line(record: str, part_of_speech: str) -> str:
    """``words (part of speech): gloss`` from one record of a ``data.*`` file (wndb(5WN))."""
    head, _, gloss = record.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)  # w_cnt is hexadecimal; each word is followed by its lex_id
    words = [_ADJ_MARKER.sub("", fields[4 + 2 * i].replace("_", " ")) for i in range(count)]
    return f"{', '.join(words)} ({part_of_speech}): {gloss.strip()}"


def clean_wordnet(folder: Path, other: str) -> str:
    """Every synset of the four ``data.*`` files of ``folder``, shuffled (seed 0), one per line.

    A line that shares eight consecutive words with ``other`` is dropped (2 today), so the
    other-domain measurement stays free of training text.
    """
    return shuffled_apart_from(_synset_lines(folder), other, "\n")


def _synset_lines(folder: Path) -> Iterator[str]:
    for name, part_of_speech in _PARTS_OF_SPEECH.items():
        for record in (folder / f"data.{name}").read_text(encoding="utf-8").splitlines():
            if not record.startswith("  "):  # the licence at the top of each file
                yield _synset_line(record, part_of_speech)


def wordnet_path() -> Path:
    return cache_dir() / "wordnet" / "wordnet.txt"


@functools.lru_cache(maxsize=1)
def wordnet_text() -> str:
    """General knowledge for training: 117,657 WordNet 3.0 definitions (about 12.4 MB).

    Source: Debian package ``wordnet-base``, unpacked without installing; see
    :func:`clean_wordnet`. Cached in ``cache_dir()/wordnet/wordnet.txt``.
    """
    return read_fetched(wordnet_path(), "the WordNet definitions")
