"""The sweep's points (`truedepth sweep`): which plans it evaluates, measuring each once, and the resumable results
store (one JSON line per finished measurement)."""

from __future__ import annotations

import copy
import datetime
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.plan import Plan, parse_int_ranges
from ...utils.env import machine
from ...utils.errors import UserError
from ...utils.io import append_jsonl, read_jsonl
from ...utils.options import default_of
from .options import TRANSFORMS, SweepOptions

PAIRED = ("parallel", "merge")  # transforms that need an even Δ
END_MARGIN = 2  # default position: the range ends this many layers before the last
RESULTS_FILE = "results.jsonl"
POINT_FIELDS = ("plan", "transform", "delta", "start", "end", "depth", "num_layers")


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
    from ...core.plan import Step

    if end - start < 2:
        return seed
    while Step("shuffle", start, end, 1, seed).order() == list(range(start, end)):
        seed += 1
    return seed


def parse_transforms(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TRANSFORMS]
    if bad or not names:
        raise UserError(
            f"unknown transform {', '.join(map(repr, bad)) or '(none)'}; use a comma list of {', '.join(TRANSFORMS)}."
        )
    return list(dict.fromkeys(names))


def default_start(rule: str, delta: int, num_layers: int) -> int:
    if rule == "end":
        return num_layers - END_MARGIN - delta
    if rule == "center":
        return (num_layers - delta) // 2
    # programming error: callers pass 'end' or 'center' only
    raise ValueError(f"unknown start rule {rule!r}")


def sweep_points(
    transforms: Sequence[str], deltas: Sequence[int], start: str, num_layers: int, include_base: bool = True
) -> tuple[list[Point], list[str]]:
    """The points to evaluate and notes on the combinations left out (odd Δ for pairs, no fit).

    Raises ValueError if a transform is left with no point at all."""
    if any(d < 1 for d in deltas):
        raise UserError(f"Δ must be at least 1 (got {min(deltas)}).")
    rule = start.strip().lower()
    starts = None if rule in ("end", "center") else parse_int_ranges(start, "--start", was_inclusive=True)
    points: list[Point] = [Point("base", 0, 0)] if include_base else []
    notes = []
    for transform in transforms:
        kept, odd, unfit = [], [], []
        for delta in deltas:
            if transform in PAIRED and delta % 2:
                odd.append(delta)
                continue
            for s in [default_start(rule, delta, num_layers)] if starts is None else starts:
                if s < 0 or s + delta > num_layers:
                    unfit.append(f"{s}:{s + delta}")
                    continue
                kept.append(Point(transform, delta, s))
        if odd:
            notes.append(f"{transform}: odd Δ {', '.join(map(str, odd))} left out (pairs need an even Δ)")
        if unfit:
            notes.append(
                f"{transform}: {len(unfit)} ranges do not fit {num_layers} layers (e.g. {unfit[0]}) and are left out"
            )
        if not kept:
            raise UserError(
                f"no {transform} point fits: {'; '.join(notes)}. Choose Δ and --start so that "
                f"start + Δ <= {num_layers}" + (" and Δ is even." if transform in PAIRED else ".")
            )
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
    return {r["key"]: r for r in read_jsonl(path) if isinstance(r, dict) and "key" in r}


def append_result(path: Path, record: dict[str, Any]) -> None:
    append_jsonl(path, record)


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
    from ...core.arch import decoder_layers

    layers = decoder_layers(model)
    rewritten = {i for s in plan.steps if s.kind in ("parallel", "merge", "skip") for i in s.layers}
    memo: dict[int, Any] = {}
    for _, tensor in list(model.named_parameters()) + list(model.named_buffers()):
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
    """What to evaluate and how, resolved from `SweepOptions` (`study.sweep_of`); `study.check_sweep` checks it
    before any work. Defaults: the command's."""

    out: Path
    transforms: list[str]
    deltas: list[int]
    start: str = default_of(SweepOptions, "start")
    seed: int = default_of(SweepOptions, "seed")
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = default_of(SweepOptions, "num_fewshot")
    limit: int | None = default_of(SweepOptions, "limit")
    text: str = default_of(SweepOptions, "text")
    tokens: int = default_of(SweepOptions, "tokens")
    window: int = default_of(SweepOptions, "window")
    stride: int | None = default_of(SweepOptions, "stride")
    model: str = default_of(SweepOptions, "model")
    dtype: str = "fp32"
    device: str | None = None  # where the model runs (not part of the results' key)
    bench: Path | None = None
    bench_mode: str | None = None
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "perplexity": {
                "text": self.text,
                "tokens": self.tokens,
                "window": self.window,
                "stride": self.stride or self.window,
            },
        }
        if self.tasks:
            s["tasks"] = {"tasks": sorted(self.tasks), "num_fewshot": self.num_fewshot, "limit": self.limit}
        return s


def point_record(point: Point, plan: Plan, num_layers: int) -> dict[str, Any]:
    end = point.start + point.delta
    return {
        "plan": str(plan),
        "transform": point.transform,
        "delta": point.delta,
        "start": point.start if point.transform != "base" else None,
        "end": end if point.transform != "base" else None,
        "depth": plan.depth(num_layers),
        "num_layers": num_layers,
    }


def measure_point(
    base: Any, tokenizer: Any, plan: Plan, todo: dict[str, str], sweep: Sweep, ids: list[int]
) -> dict[str, dict[str, Any]]:
    """Transform a copy of `base` with `plan` and run the measurements named in `todo`."""
    from ...core.transform import apply_plan
    from ...measure.eval.perplexity import perplexity

    model = plan_copy(base, plan)
    apply_plan(model, plan)
    results: dict[str, dict[str, Any]] = {}
    try:
        if "perplexity" in todo:
            t0 = time.perf_counter()
            ppl = perplexity(
                model, tokenizer, ids, tokens=sweep.tokens, window=sweep.window, stride=sweep.stride, progress=False
            )
            results["perplexity"] = {**ppl, "seconds": round(time.perf_counter() - t0, 2)}
        if "tasks" in todo:
            from ...measure.eval.icl import evaluate_tasks

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

    from ...core.arch import decoder_layers

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
                append_result(
                    path,
                    {
                        "key": keys[measure],
                        "measure": measure,
                        **point_record(point, plan, num_layers),
                        "settings": settings,
                        **value,
                        "machine": where,
                        "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    },
                )
            bar.update(1)


def num_layers_of(model_spec: str) -> int:
    """Depth of the model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from ...core import hf  # noqa: F401  registers truedepth model types
    from ...core.arch import require_original
    from ...core.loading import resolve

    config = AutoConfig.from_pretrained(resolve(model_spec), trust_remote_code=False)
    require_original(config, f"sweep the original model, not {model_spec}", UserError)
    return int(config.num_hidden_layers)


def text_ids(sweep: Sweep) -> list[int]:
    """Tokenise the perplexity text once, and check it fills a window, before loading the model."""
    from transformers import AutoTokenizer

    from ...core.loading import resolve
    from ...measure.eval.data import load_text
    from ...measure.eval.perplexity import make_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(resolve(sweep.model), trust_remote_code=False)
    ids = tokenize(tokenizer, load_text(sweep.text), sweep.tokens)
    make_windows(ids, sweep.tokens, sweep.window, sweep.stride)
    return ids
