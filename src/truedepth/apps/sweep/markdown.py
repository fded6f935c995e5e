"""Markdown pieces of the sweep report: numbers, percentages, tables and metric cells."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .tables import metric_columns


def fmt_number(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def percent(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def md_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def task_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [c for c in metric_columns(rows) if c != "perplexity"]


def metric_cell(r: dict[str, Any] | None, col: str) -> str:
    """'value (kept %)' with ± stderr for tasks."""
    if r is None or r.get(col) is None:
        return "–"
    v, rel = r[col], r.get(f"{col}_rel")
    text = f"{v:.2f}" if col == "perplexity" else f"{v:.3f} ± {fmt_number(r.get(col + '_stderr'), '.3f')}"
    return text + (f" ({100 * rel:.0f} %)" if rel is not None else "")
