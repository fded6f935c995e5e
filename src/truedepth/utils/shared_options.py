"""Options that commands in several layers share, each declared once here: a command's dataclass
composes the group it takes and, where the option means something particular there, says so with
`override(help_note=...)` (see truedepth.utils.options)."""

from __future__ import annotations

from dataclasses import dataclass

from .options import option


@dataclass
class ThreadsOption:
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")


@dataclass
class SeedOption:
    seed: int = option(0, "random seed")


@dataclass
class ProgressOption:
    no_progress: bool = option(False, "no progress bars")


@dataclass
class QuietOption:
    quiet: bool = option(False, "no progress bars")


@dataclass
class OutDirOption:
    out: str | None = option(None, "output folder", metavar="DIR")


@dataclass
class OverwriteOption:
    overwrite: bool = option(False, "replace the output if it exists")


@dataclass
class JsonFileOption:
    json_file: str | None = option(None, "write the results to this JSON file.", flag="--json", metavar="FILE")


@dataclass
class PlotFileOption:
    plot: str | None = option(
        None, "write a plot of the results to this image file (needs matplotlib).", metavar="FILE"
    )
