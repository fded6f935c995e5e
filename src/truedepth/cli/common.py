"""Options that only the command line has and several commands share (each command's other options are
declared in the library: see truedepth.utils.options)."""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.options import option


@dataclass
class Printing:
    """How a command prints its result (CLI only: the library returns it)."""

    json: bool = option(False, "print one JSON object instead of the text report")
