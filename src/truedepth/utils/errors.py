"""The one family of errors that mean "the user's input is wrong": the CLI prints them as one line.

Every class here is a ValueError, so code that catches ValueError keeps working. Library code raises
them where it knows the input came from the user (a path, a plan, an option); other exceptions are
bugs and keep their tracebacks.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """Bad input: the message names the problem and the fix."""


class InputPathError(UserError):
    """A file or folder the user named is missing, of the wrong kind, or unreadable."""


class OutputPathError(UserError):
    """An output path that cannot be written, or would overwrite something that is not ours."""


class MissingAssetError(UserError):
    """An offline asset (model, text) was not fetched at set-up; the message names the command."""


class MeasurementError(UserError):
    """A measurement the given options cannot support (e.g. a time difference below its noise)."""


def check_output_file(path: str | os.PathLike | None, option: str) -> None:
    """`path` can be written as a file: not a folder, and its parent is (or can be) a folder."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file name, e.g. {Path(path) / 'out.json'}.")
    _check_parent(p, option, path)


def check_output_dir(path: str | os.PathLike | None, option: str) -> None:
    """`path` can be used as an output folder: it is a folder, or can be created as one."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{option} {path}: is a file, not a folder; give a folder name (it is created).")
    _check_parent(p, option, path)


def _check_parent(p: Path, option: str, given: str | os.PathLike) -> None:
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{option} {given}: {parent} is a file, not a folder; choose another path.")
            if not os.access(parent, os.W_OK):
                raise OutputPathError(f"{option} {given}: {parent} is not writable; choose another path.")
            return
