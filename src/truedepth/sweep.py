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
import math
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
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
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
    with tqdm(total=len(todo), unit="plan", desc="sweep", disable=not sweep.progress, dynamic_ncols=True) as bar:
        for point, keys in todo:
            plan = point.plan(sweep.seed)
            bar.set_postfix_str(str(plan))
            results = measure_point(model, tokenizer, plan, keys, sweep, ids)
            for measure, value in results.items():
                append_result(path, {"key": keys[measure], "measure": measure, **point_record(point, plan, num_layers),
                                     "settings": settings,
                                     **value, "date": datetime.datetime.now().isoformat(timespec="seconds")})
            bar.update(1)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def collect_rows(records: Iterable[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per plan measured under `settings` (model, dtype, text and task settings).

    Columns: plan, transform, delta, start, end, depth, perplexity, and for every task result
    '<task>' (its headline metric, usually acc) plus '<task>_stderr' and '<task>_n'.
    """
    from .icl import headline

    wanted_ppl = settings["perplexity"]
    wanted_tasks = settings.get("tasks")
    rows: dict[str, dict[str, Any]] = {}

    def row_of(r: dict[str, Any]) -> dict[str, Any]:
        return rows.setdefault(r["plan"], {k: r.get(k) for k in POINT_FIELDS})

    for r in records:
        s = r.get("settings", {})
        if s.get("model") != settings["model"] or s.get("dtype") != settings["dtype"]:
            continue
        if r["measure"] == "perplexity" and s.get("perplexity") == wanted_ppl:
            row_of(r)["perplexity"] = r["perplexity"]
        elif r["measure"] == "tasks" and (wanted_tasks is None or s.get("tasks") == wanted_tasks):
            for task, metrics in r["tasks"].items():
                if wanted_tasks is not None and task not in wanted_tasks["tasks"]:
                    continue  # subtasks and subgroups stay in results.jsonl only
                metric, value = headline(r["tasks"], task)
                row = row_of(r)
                row[task] = value
                row[f"{task}_stderr"] = metrics.get(f"{metric}_stderr")
                row[f"{task}_n"] = metrics.get("n_samples")
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


def _axes(plt, n: int):
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    return fig, axes[0]


def _label(metric: str) -> str:
    return "perplexity (log scale)" if metric == "perplexity" else f"{metric} (accuracy)"


def _base_line(ax, rows, metric) -> None:
    base = next((r for r in rows if r["transform"] == "base" and r.get(metric) is not None), None)
    if base is not None:
        ax.axhline(base[metric], color="black", ls=":", lw=1, label="base")


def _finish(fig, ax_list, metrics, path: Path, title: str) -> Path:
    for ax, metric in zip(ax_list, metrics):
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def anchored(row: dict[str, Any], rule: str) -> bool:
    """Is the row's range at the default position `rule` for its Δ?"""
    if row["transform"] == "base" or row.get("start") is None:
        return False
    return row["start"] == default_start(rule, row["delta"], row["num_layers"])


def plot_delta(rows: Sequence[dict[str, Any]], path: Path, rule: str = "end", title: str = "") -> Path | None:
    """Metric against Δ for each transform, ranges at the default position (the paper's figure)."""
    metrics = metric_columns(rows)
    pts = [r for r in rows if anchored(r, rule)]
    if not pts or not metrics:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    for ax, metric in zip(axes, metrics):
        for transform in TRANSFORMS:
            xs = sorted((r["delta"], r[metric]) for r in pts if r["transform"] == transform and r.get(metric) is not None)
            if xs:
                ax.plot(*zip(*xs), "o-", color=COLORS[transform], label=transform)
        _base_line(ax, rows, metric)
        ax.set_xlabel("Δ = layers transformed" + (" (range ends at L-2)" if rule == "end" else " (centred)"))
    return _finish(fig, axes, metrics, path, title or "Quality against Δ")


def plot_start(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Metric against start position, one line per (transform, Δ) with at least 3 starts."""
    metrics = metric_columns(rows)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["transform"] != "base":
            groups.setdefault((r["transform"], r["delta"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["start"] for r in v}) >= 3}
    if not groups or not metrics:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    styles = ["o-", "s--", "^-.", "d:"]
    for ax, metric in zip(axes, metrics):
        for i, ((transform, delta), rs) in enumerate(sorted(groups.items())):
            xs = sorted((r["start"], r[metric]) for r in rs if r.get(metric) is not None)
            if len(xs) >= 2:
                ax.plot(*zip(*xs), styles[i % len(styles)], color=COLORS[transform], label=f"{transform} Δ={delta}")
        _base_line(ax, rows, metric)
        ax.set_xlabel("start layer of the range (first transformed layer)")
    return _finish(fig, axes, metrics, path, title or "Quality against position at fixed Δ")


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
    metrics = metric_columns(rows)
    if not metrics:
        return None

    def xval(r):
        return bench.get(r["plan"]) if bench is not None else r["depth"]

    pts = [r for r in rows if xval(r) is not None]
    if not pts:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    for ax, metric in zip(axes, metrics):
        lower_better = metric == "perplexity"
        for transform in ("base",) + TRANSFORMS:
            xs = [(xval(r), r[metric]) for r in pts if r["transform"] == transform and r.get(metric) is not None]
            if xs:
                ax.scatter(*zip(*xs), color=COLORS[transform], label=transform, s=22 if transform != "base" else 60,
                           marker="o" if transform != "base" else "*", zorder=3)
        allpts = [(xval(r), r[metric]) for r in pts if r.get(metric) is not None]
        front = pareto_front(allpts, lower_x_better=True, lower_y_better=lower_better)
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="gray", lw=1, alpha=0.7, label="Pareto front")
        ax.set_xlabel("decode ms per token (from bench)" if bench is not None else "depth (sequential layers)")
    return _finish(fig, axes, metrics, path, title or ("Quality against decode time" if bench else
                                                       "Quality against depth"))


def make_plots(out: Path, rows: Sequence[dict[str, Any]], rule: str = "end",
               bench: dict[str, float] | None = None, model: str = "") -> list[Path]:
    made = [plot_delta(rows, out / "delta.png", rule, f"{model}: quality against Δ"),
            plot_start(rows, out / "start.png", f"{model}: quality against position"),
            plot_pareto(rows, out / "pareto.png", bench, f"{model}: quality against " +
                        ("decode time" if bench else "depth"))]
    return [p for p in made if p is not None]


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
                 bench=bench, progress=not args.no_progress)


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
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {torch.get_num_threads()} torch threads, no GPU"


def finish(sweep: Sweep, notes: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Tables and plots from everything in OUT/results.jsonl measured under the sweep's settings."""
    records = list(read_results(sweep.out / RESULTS_FILE).values())
    rows = collect_rows(records, sweep.settings())
    if not rows:
        raise RuntimeError(f"{sweep.out / RESULTS_FILE} holds no result for these settings "
                           f"({json.dumps(sweep.settings())}); run the sweep first (without --plot-only).")
    rule = sweep.start if sweep.start in ("end", "center") else "end"
    meta = {"settings": sweep.settings(), "machine": machine(), "notes": list(notes),
            "written": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "truedepth " + " ".join(sys.argv[1:]) if sys.argv else ""}
    write_tables(sweep.out, rows, meta)
    bench = read_bench(sweep.bench, getattr(sweep, "bench_mode", None)) if sweep.bench else None
    make_plots(sweep.out, rows, rule, bench, sweep.model)
    return rows


def run(args: argparse.Namespace) -> int:
    sweep = sweep_from_args(args)
    sweep.bench_mode = args.bench_mode  # type: ignore[attr-defined]
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
    rows = finish(sweep, notes)
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
