"""The sweep's results as tables: one row per plan, kept fractions, CSV/JSON files, bench speeds."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...core.plan import Plan, PlanError
from ...utils.errors import InputPathError, UserError
from .points import POINT_FIELDS, TRANSFORMS, default_start


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def task_column(task: str, num_fewshot: int | None) -> str:
    """Column name of a task result: the task, with '@Kshot' when it ran with K > 0 examples."""
    return f"{task}@{num_fewshot}shot" if num_fewshot else task


def collect_rows(records: Iterable[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per plan, from the records measured on the sweep's model and dtype.

    Columns: plan, transform, delta, start, end, depth, num_layers; 'perplexity' (only under the
    sweep's perplexity settings); for every task ever run on the plan, '<task>[@Kshot]' (its
    headline metric, usually acc) with '<...>_stderr' and '<...>_n' (examples scored). If a task
    was run with different limits, the run with more examples wins. Then '<metric>_rel'.
    """
    from ...measure.eval.icl import headline

    rows: dict[str, dict[str, Any]] = {}

    def row_of(r: dict[str, Any]) -> dict[str, Any]:
        return rows.setdefault(r["plan"], {k: r.get(k) for k in POINT_FIELDS})

    for r in records:
        s = r.get("settings", {})
        if s.get("model") != settings["model"] or s.get("dtype") != settings["dtype"]:
            continue
        if r["measure"] == "perplexity" and s.get("perplexity") == settings["perplexity"]:
            row_of(r)["perplexity"] = r["perplexity"]
        elif r["measure"] == "tasks":
            asked = s.get("tasks", {})
            for task in asked.get("tasks", []):  # subtasks and subgroups stay in results.jsonl only
                if task not in r["tasks"]:
                    continue
                metrics = r["tasks"][task]
                metric, value = headline(r["tasks"], task)
                col = task_column(task, asked.get("num_fewshot"))
                row = row_of(r)
                n = metrics.get("n_samples") or 0
                if row.get(f"{col}_n") is not None and row[f"{col}_n"] > n:
                    continue
                row[col] = value
                row[f"{col}_stderr"] = metrics.get(f"{metric}_stderr")
                row[f"{col}_n"] = n
    out = list(rows.values())
    add_relative(out)
    order = {t: i for i, t in enumerate(("base",) + TRANSFORMS)}
    return sorted(out, key=lambda r: (order.get(r["transform"], 9), r["delta"], r["start"] or 0))


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """perplexity first, then task metrics, in first-seen order."""
    fixed = set(POINT_FIELDS)
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in fixed and k not in cols and not k.endswith(("_stderr", "_n", "_rel")):
                cols.append(k)
    return sorted(cols, key=lambda c: c != "perplexity")


def add_relative(rows: list[dict[str, Any]]) -> None:
    """'<metric>_rel': metric / base metric (for perplexity: base / metric, so that 1 = kept fully)."""
    base = next((r for r in rows if r["transform"] == "base"), None)
    if base is None:
        return
    for col in metric_columns(rows):
        b = base.get(col)
        for r in rows:
            v = r.get(col)
            if v is None or b is None or not v or not b:
                continue
            r[f"{col}_rel"] = b / v if col == "perplexity" else v / b


def write_tables(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    cols = ["plan", "transform", "delta", "start", "end", "depth"]
    for c in metric_columns(rows):
        cols += [c, f"{c}_rel"] + ([f"{c}_stderr", f"{c}_n"] if c != "perplexity" else [])
    csv_path, json_path = out / "sweep.csv", out / "sweep.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    return csv_path, json_path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = metric_columns(rows)
    head = ["plan", "depth"] + cols
    lines = [head]
    for r in rows:
        cells = [r["plan"], str(r["depth"])]
        for c in cols:
            v = r.get(c)
            rel = r.get(f"{c}_rel")
            cells.append("-" if v is None else (f"{v:.3f}" + (f" ({100 * rel:.0f}%)" if rel is not None else "")))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


# ---------------------------------------------------------------------------------------------
# Bench JSON (for the Pareto plot against time)
# ---------------------------------------------------------------------------------------------
_SPEED_KEYS = ("decode_tokens_per_s", "decode_tok_s", "tokens_per_s", "tok_s", "decode_tok_per_s")


def read_bench(path: Path, mode: str | None = None, batch: int | None = None) -> dict[str, float]:
    """plan string -> decode milliseconds per token, from a `truedepth bench` JSON.

    Lenient: a list of records, or a dict holding one under 'records'/'results'; JSON lines work
    too. A record needs a plan (string or plan dict) and a decode speed (any of decode_tokens_per_s,
    decode_tok_s, tokens_per_s). With several modes/batches, `mode` and `batch` pick one (default:
    the first mode seen, batch 1 if present); records with an 'error' are ignored.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(
                f"--bench {path} is not the JSON of `truedepth bench --json` ({e}); write it with "
                f"`truedepth bench --json {path}`."
            ) from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("records", "results", "rows") if isinstance(data.get(k), list)), [data])
    records = [
        r
        for r in data
        if isinstance(r, dict)
        and "plan" in r
        and "error" not in r
        and any(isinstance(r.get(k), (int, float)) for k in _SPEED_KEYS)
    ]
    if not records:
        raise InputPathError(
            f"{path} holds no bench record with a plan and a decode speed "
            f"({', '.join(_SPEED_KEYS)}); write one with `truedepth bench --json {path}`."
        )
    modes = [r.get("mode") for r in records]
    mode = mode if mode is not None else modes[0]
    records = [r for r in records if r.get("mode") == mode]
    batches = sorted({r.get("batch", 1) for r in records})
    batch = batch if batch is not None else (1 if 1 in batches else batches[0])
    out: dict[str, float] = {}
    for r in records:
        if r.get("batch", 1) != batch:
            continue
        plan = r["plan"] if isinstance(r["plan"], str) else Plan.from_dict(r["plan"])
        speed = next(r[k] for k in _SPEED_KEYS if isinstance(r.get(k), (int, float)))
        try:
            key = str(Plan.parse(plan) if isinstance(plan, str) else plan)
        except PlanError:
            continue
        out.setdefault(key, 1000.0 / speed)
    return out


def anchored(row: dict[str, Any], rule: str) -> bool:
    """Is the row's range at the default position `rule` for its Δ?"""
    if row["transform"] == "base" or row.get("start") is None:
        return False
    return row["start"] == default_start(rule, row["delta"], row["num_layers"])


def _at_chance(rows: Sequence[dict[str, Any]], col: str) -> bool:
    """Is the base model's accuracy on this task within two standard errors of chance?"""
    from ...measure.eval.icl import chance_level

    level = chance_level(col.split("@")[0])
    base = next((r for r in rows if r["transform"] == "base" and r.get(col) is not None), None)
    if level is None or base is None:
        return False
    return base[col] - level < 2 * (base.get(f"{col}_stderr") or 0.0)
