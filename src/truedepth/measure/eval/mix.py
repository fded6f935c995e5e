"""Mixing texts: '+' specs, in proportion to length or in given shares ('W*text')."""

from __future__ import annotations

import re
from pathlib import Path

from ...utils.errors import UserError

_MIX_CHUNK = 20_000  # characters per piece when texts are interleaved (a few 512-token windows)


def _piece_counts(available: list[int], shares: list[float]) -> list[int]:
    """How many pieces of each text a mix in ``shares`` takes: as many as the scarcest text allows."""
    total = sum(shares)
    fractions = [w / total for w in shares]
    size = min(n / f for n, f in zip(available, fractions))
    return [min(n, round(f * size)) for n, f in zip(available, fractions)]


def _evenly_spaced(pieces: list[str], count: int) -> list[str]:
    """``count`` of ``pieces`` spread over the whole text (all of them when count covers it)."""
    return [pieces[i * len(pieces) // count] for i in range(count)]


def interleave(texts: list[str], chunk: int = _MIX_CHUNK, shares: list[float] | None = None) -> str:
    """Cut each text into ``chunk``-character pieces and interleave them.

    Without ``shares`` every piece is used, in proportion to length. With ``shares`` (relative
    weights, one per text) the mix has those shares and is as long as the scarcest text allows;
    a text with more than its share gives pieces evenly spaced over its whole length. Evenly
    spaced calibration windows and every stretch of a training run then see each text in its
    share, not one text after the other.
    """
    pieces = [[t[i : i + chunk] for i in range(0, len(t), chunk)] for t in texts]
    if shares is not None:
        counts = _piece_counts([len(p) for p in pieces], shares)
        pieces = [_evenly_spaced(p, c) for p, c in zip(pieces, counts)]
    taken = [0] * len(pieces)
    out = []
    while any(k < len(p) for k, p in zip(taken, pieces)):
        # next piece from the text that is furthest behind its share
        j = min((k / len(p), j) for j, (k, p) in enumerate(zip(taken, pieces)) if k < len(p))[1]
        out.append(pieces[j][taken[j]])
        taken[j] += 1
    return "\n\n".join(out)


_WEIGHTED = re.compile(r"^(?P<weight>\d+(?:\.\d*)?|\.\d+)\s*\*\s*(?P<text>.+)$")


def mix_parts(spec: str) -> tuple[list[str], list[float] | None]:
    """The texts a '+' spec joins and their shares (``None``: in proportion to length)."""
    if "+" not in spec or Path(spec).expanduser().is_file():
        return [spec], None
    parts = [part.strip() for part in spec.split("+")]
    if not all(parts):
        raise UserError(
            f"text spec {spec!r} has an empty part around '+'; join two or more texts, e.g. 'austen-train+fortunes'."
        )
    weighted = [_WEIGHTED.match(part) for part in parts]
    if not any(weighted):
        return parts, None
    if not all(weighted):
        raise UserError(
            f"text spec {spec!r} gives a share ('W*text') to some parts only; give one to every "
            "part, e.g. '25*austen-train+40*fortunes+35*sotu', or to none."
        )
    shares = [float(m["weight"]) for m in weighted]
    if not all(w > 0 for w in shares):
        raise UserError(f"text spec {spec!r} has a share of 0; every 'W*text' needs W > 0.")
    return [m["text"].strip() for m in weighted], shares


def text_parts(spec: str) -> list[str]:
    """The texts a spec joins with '+' (``[spec]`` for one text, or for a file whose name holds a '+')."""
    return mix_parts(spec)[0]
