"""Assertions on the command line's answer to a user error (tests/test_cli_errors.py and others)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from truedepth.cli.main import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_user_error(capsys, *argv: str, words: str = "") -> str:
    """`truedepth argv` ends with exit code 2 and ONE line on stderr that names `words`, no traceback."""
    code, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"truedepth {argv[0]}: error: "), err
    assert words.lower() in lines[0].lower(), err
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its SHA-256: equal before and after means nothing changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
