"""Files that a reader never sees half-written: the one atomic writer, and append-only JSONL.

`atomic_write` writes to a per-process temporary name in the same folder, fsyncs it and renames it
into place, so a crash or a concurrent reader sees the old file or the new one, never a mix.
`append_jsonl` adds one record per line (fsynced); `read_jsonl` skips a torn last line that a
killed run left behind.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PATH_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".safetensors", ".bin", ".gguf", ".pt", ".pth")


def looks_like_path(spec: str) -> bool:
    """True for a string that can only mean a local file or folder (so a typo never reaches a hub):
    it starts with / . or ~, has more than one /, or ends in a file suffix."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or Path(spec).suffix.lower() in PATH_SUFFIXES


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the content is on disk when this returns)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def temp_file(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh name next to `path` (same folder, so a rename is atomic), removed after if still there.
    Only a name: the writer creates the file, with the usual permissions (mkstemp's are 0600). The
    pid and a random suffix keep concurrent writers from clobbering each other's temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write to the yielded temporary name; it becomes `path` (in one rename) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_file(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace `path` with `data` (text is written as UTF-8) in one rename."""
    with atomic_path(path) as tmp:
        write_synced(tmp, data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, default=str))


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one JSON line; a torn line left by a killed run is ended first, so it cannot swallow this one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> Iterator[Any]:
    """The records of a JSONL file in order; lines that do not parse (a torn last line) are skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
