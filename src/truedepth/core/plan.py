"""Plans: one data structure saying what happens to each layer of a model.

A plan is an ordered list of steps over the *original* layer indices. Layers no step mentions
are kept. The same plan flows unchanged from the CLI string, through JSON, into the transform.

Grammar (steps joined by commas, ranges are Python-style ``start:end`` with ``end`` exclusive):

    parallel=A:B[/G]   layers A..B-1 in consecutive groups of G (default 2) run in parallel
    merge=A:B[/G]      layers A..B-1 in consecutive groups of G (default 2), each averaged into one
    skip=A[:B]         drop layer A (or layers A..B-1)
    shuffle=A:B[@S]    run layers A..B-1 in an order drawn with seed S (default 0)
    keep=A[:B]         keep layers explicitly (the default for unmentioned layers)

An empty string, ``none`` or ``base`` is the identity plan. Example:
``parallel=14:24,skip=27`` pairs layers 14..23 and drops layer 27.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..utils.errors import UserError

GROUPED_KINDS = ("parallel", "merge")
STEP_KINDS = ("parallel", "merge", "skip", "shuffle", "keep")
IDENTITY_WORDS = ("", "none", "base", "identity")

GRAMMAR_HELP = """\
Plan grammar: steps joined by commas; ranges are start:end with end exclusive (0-based).
  parallel=A:B[/G]  groups of G (default 2) consecutive layers in A..B-1 read the same input
                    and their outputs are summed (fused into one wide layer)
  merge=A:B[/G]     each group of G (default 2) consecutive layers is replaced by the average
                    of their weights
  skip=A[:B]        drop layer A (or layers A..B-1)
  shuffle=A:B[@S]   run layers A..B-1 in a random order drawn with seed S (default 0)
  keep=A[:B]        keep layers (the default for layers no step mentions)
Examples: parallel=14:24   parallel=14:26/3   parallel=2:6,skip=27   shuffle=10:20@0   merge=20:24/2
'base' or '' is the original model."""


class PlanError(UserError):
    """A plan that cannot be parsed or does not fit a model. The message names the step and the fix."""


@dataclass(frozen=True)
class Step:
    kind: str
    start: int
    end: int  # exclusive
    group: int = 1  # group size for parallel/merge
    seed: int = 0  # shuffle seed

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise PlanError(f"unknown step kind {self.kind!r}; use one of {', '.join(STEP_KINDS)}.\n{GRAMMAR_HELP}")
        if self.start < 0 or self.end <= self.start:
            raise PlanError(
                f"step '{self}': the range {self.start}:{self.end} is empty or negative; "
                "write start:end with 0 <= start < end (end exclusive)."
            )
        if self.kind in GROUPED_KINDS:
            if self.group < 2:
                raise PlanError(
                    f"step '{self}': a {self.kind} group needs at least 2 layers, got {self.group}; "
                    f"use /2 or more, or 'keep' for single layers."
                )
            size = self.end - self.start
            if size % self.group:
                lo = self.start + (size // self.group) * self.group
                hi = lo + self.group
                fix = f"{self.start}:{hi}" + (f" or {self.start}:{lo}" if lo > self.start else "")
                raise PlanError(
                    f"step '{self}': {size} layers do not split into groups of {self.group}; use the range {fix}."
                )
        elif self.group != 1:
            raise PlanError(f"step '{self}': only parallel and merge take a group size.")

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def groups(self) -> list[tuple[int, ...]]:
        """The consecutive groups of a parallel/merge step."""
        return [tuple(range(s, s + self.group)) for s in range(self.start, self.end, self.group)]

    def order(self) -> list[int]:
        """Layer order of a shuffle step: a seeded permutation, the same on every machine."""
        order = list(self.layers)
        random.Random(self.seed).shuffle(order)
        return order

    def __str__(self) -> str:
        rng = (
            f"{self.start}"
            if self.end == self.start + 1 and self.kind in ("skip", "keep")
            else f"{self.start}:{self.end}"
        )
        if self.kind in GROUPED_KINDS and self.group != 2:
            rng += f"/{self.group}"
        if self.kind == "shuffle":
            rng += f"@{self.seed}"
        return f"{self.kind}={rng}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "start": self.start, "end": self.end}
        if self.kind in GROUPED_KINDS:
            d["group"] = self.group
        if self.kind == "shuffle":
            d["seed"] = self.seed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        if not isinstance(d, dict):
            raise PlanError(
                f"plan step {d!r} is not an object; write each step as "
                '{"kind": "parallel", "start": 2, "end": 6} (JSON) or use the text form parallel=2:6.'
            )
        d = dict(d)
        kind = d.pop("kind", None)
        if kind is None:
            raise PlanError(f"plan step {d} has no 'kind'; use one of {', '.join(STEP_KINDS)}.")
        if not isinstance(kind, str):
            raise PlanError(f"plan step {d}: 'kind' must be one of {', '.join(STEP_KINDS)}, got {kind!r}.")
        if "layers" in d:  # explicit member list, e.g. {"kind": "parallel", "layers": [3, 4]}
            members = d.pop("layers")
            if not isinstance(members, (list, tuple)):
                raise PlanError(f"step {kind}: 'layers' must be a list of layer numbers, got {members!r}.")
            layers = [_integer(kind, "layers", i) for i in members]
            if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
                raise PlanError(
                    f"step {kind} {layers}: members must be consecutive layers in increasing "
                    f"order (e.g. {kind}={min(layers, default=0)}:{min(layers, default=0) + len(layers)})."
                )
            d.setdefault("group", len(layers) if kind in GROUPED_KINDS else 1)
            d["start"], d["end"] = layers[0], layers[-1] + 1
        unknown = set(d) - {"start", "end", "group", "seed"}
        if unknown:
            raise PlanError(f"plan step '{kind}' has unknown fields {sorted(unknown)}.")
        if "start" not in d:
            raise PlanError(
                f"plan step '{kind}' has no 'start'; give the range as \"start\" and \"end\" "
                '(end exclusive) or the member list as "layers".'
            )
        start = _integer(kind, "start", d["start"])
        fields = {name: _integer(kind, name, d[name]) for name in ("end", "group", "seed") if name in d}
        group = fields.get("group", 2 if kind in GROUPED_KINDS else 1)
        return cls(kind, start, fields.get("end", start + 1), group, fields.get("seed", 0))


def _integer(kind: str, name: str, value: Any) -> int:
    """A JSON number that is a whole number (2 or 2.0), else PlanError naming the field."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise PlanError(f"plan step '{kind}': {name!r} must be an integer, got {value!r}.")
    return int(value)


# ASCII digits only, at most 9 of them (no model has a billion layers; int() of a huge string is slow)
_NUMBER = r"[0-9]{1,9}"
_STEP_RE = re.compile(
    rf"^(?P<kind>[a-z]+)=(?P<start>{_NUMBER})(?::(?P<end>{_NUMBER}))?(?:/(?P<group>{_NUMBER}))?"
    rf"(?:@(?P<seed>{_NUMBER}))?$"
)


def _parse_step(text: str) -> Step:
    m = _STEP_RE.match(text.strip().replace(" ", ""))
    if not m:
        raise PlanError(f"cannot parse plan step {text!r}.\n{GRAMMAR_HELP}")
    kind, start = m["kind"], int(m["start"])
    end = int(m["end"]) if m["end"] is not None else None
    if kind in ("parallel", "merge", "shuffle") and end is None:
        raise PlanError(f"step {text!r}: {kind} needs a range start:end, e.g. {kind}={start}:{start + 2}.")
    if m["group"] is not None and kind not in GROUPED_KINDS:
        raise PlanError(f"step {text!r}: only parallel and merge take a group size (/G).")
    if m["seed"] is not None and kind != "shuffle":
        raise PlanError(f"step {text!r}: only shuffle takes a seed (@S).")
    group = int(m["group"]) if m["group"] is not None else (2 if kind in GROUPED_KINDS else 1)
    return Step(kind, start, end if end is not None else start + 1, group, int(m["seed"] or 0))


@dataclass(frozen=True)
class Block:
    """One layer of the transformed model: its kind and the original layers it is made from."""

    kind: str  # keep | parallel | merge
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = field(default_factory=tuple)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Plan:
        if text is not None and not isinstance(text, str):
            return as_plan(text)
        text = (text or "").strip()
        if text.lower() in IDENTITY_WORDS:
            return cls(())
        if text.startswith("{") or text.startswith("["):
            return cls.from_json(text)
        return cls(tuple(_parse_step(part) for part in text.split(",") if part.strip()))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | Sequence[dict[str, Any]]) -> Plan:
        """The JSON form: {"steps": [step, ...]} (as written by `to_dict`), or the list of steps."""
        if isinstance(d, dict):
            if "steps" not in d:
                if isinstance(d.get("plan"), str):  # {"plan": "parallel=2:6"}
                    return cls.parse(d["plan"])
                raise PlanError(
                    f"a plan object needs a 'steps' list, got the keys {sorted(map(str, d))}; write "
                    '{"steps": [{"kind": "parallel", "start": 2, "end": 6}]} (a single step goes '
                    "inside the list)."
                )
            d = d["steps"]
        if not isinstance(d, (list, tuple)):
            raise PlanError(f"a plan's steps must be a list of step objects, got {d!r}.")
        return cls(tuple(Step.from_dict(s) for s in d))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise PlanError(
                f"the plan is not valid JSON ({str(e)[:120] or type(e).__name__}); write "
                '{"steps": [...]} or the text form, e.g. parallel=2:6.'
            ) from None
        return cls.from_dict(value)

    @classmethod
    def parallel(cls, start: int, end: int, group_size: int = 2) -> Plan:
        return cls((Step("parallel", start, end, group_size),))

    def __add__(self, other: Plan) -> Plan:
        return Plan(self.steps + as_plan(other).steps)

    # ---- output -------------------------------------------------------------------------
    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps) or "base"

    def to_dict(self) -> dict[str, Any]:
        return {"plan": str(self), "steps": [s.to_dict() for s in self.steps]}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    # ---- meaning against a model ----------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return all(s.kind == "keep" for s in self.steps)

    def validate(self, num_layers: int) -> None:
        """Raise PlanError naming the offending step if the plan does not fit `num_layers` layers."""
        owner: dict[int, Step] = {}
        for step in self.steps:
            if step.end > num_layers:
                raise PlanError(
                    f"step '{step}': layer {step.end - 1} is out of range; the model has "
                    f"{num_layers} layers (0..{num_layers - 1}). Use an end of at most {num_layers}."
                )
            for i in step.layers:
                if i in owner:
                    raise PlanError(
                        f"steps '{owner[i]}' and '{step}' both use layer {i}; each layer may "
                        "appear in at most one step. Split or shorten one of them."
                    )
                owner[i] = step
        if not self.blocks(num_layers, _validated=True):
            raise PlanError(f"plan '{self}' removes every layer; keep at least one.")

    def blocks(self, num_layers: int, _validated: bool = False) -> list[Block]:
        """The layers of the transformed model, in order, each with the original layers it uses."""
        if not _validated:
            self.validate(num_layers)
        by_start = {s.start: s for s in self.steps}
        out: list[Block] = []
        i = 0
        while i < num_layers:
            step = by_start.get(i)
            if step is None or step.kind == "keep":
                end = step.end if step else i + 1
                out.extend(Block("keep", (j,)) for j in range(i, end))
                i = end
                continue
            if step.kind in GROUPED_KINDS:
                out.extend(Block(step.kind, g) for g in step.groups())
            elif step.kind == "shuffle":
                out.extend(Block("keep", (j,)) for j in step.order())
            i = step.end  # skip contributes nothing
        return out

    def depth(self, num_layers: int) -> int:
        return len(self.blocks(num_layers))

    def parallel_layers(self, num_layers: int) -> list[int]:
        """Original indices of the layers that run in parallel groups."""
        return [j for b in self.blocks(num_layers) if b.kind == "parallel" for j in b.layers]


PlanLike = "Plan | str | dict | Sequence[dict] | None"


def as_plan(plan: Any) -> Plan:
    """Accept a Plan, a plan string, its JSON/dict form, or None (identity)."""
    if plan is None:
        return Plan(())
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        return Plan.parse(plan)
    if isinstance(plan, (dict, list, tuple)):
        return Plan.from_dict(plan)  # type: ignore[arg-type]
    raise PlanError(f"cannot make a plan from {type(plan).__name__}; pass a string like 'parallel=14:24'.")


def widths(blocks: Iterable[Block]) -> list[int]:
    """Group size of every layer of a transformed model (1 for ordinary layers)."""
    return [len(b.layers) if b.kind == "parallel" else 1 for b in blocks]


# ---------------------------------------------------------------------------------------------
# Integer ranges on the command line: the plan grammar's A:B (end exclusive), plus a step
# ---------------------------------------------------------------------------------------------
class RangeChangeWarning(UserWarning):
    """An A:B range that an older truedepth read with its end included (sweep's --delta/--start)."""


def parse_int_ranges(text: str, what: str, minimum: int | None = None, was_inclusive: bool = False) -> list[int]:
    """'8', '2,4,8', 'A:B' or 'A:B:S' (end exclusive, as in plans: 2:8:2 is 2, 4, 6) -> sorted unique ints.

    `was_inclusive`: the option used to include B. A stepped range whose B lies on its step (it
    would silently lose B) is refused with both new spellings; a plain A:B gets a warning."""
    out: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if ".." in part:  # the inclusive A..B that `search --target-depth` used to take
            lo, _, hi = part.partition("..")
            a, b = sorted((int(lo), int(hi))) if lo.isdigit() and hi.isdigit() else (0, 0)
            raise UserError(
                f"{what} {part}: write ranges as A:B, end exclusive as in plans"
                + (f" ({a}:{b + 1} for {a}..{b})." if b else ".")
            )
        try:
            bits = [int(b) for b in part.split(":")]
        except ValueError:
            raise UserError(
                f"cannot read {what} {part!r}; write a number, a list '2,4,8' or a range 'A:B[:STEP]' "
                "(end exclusive, as in plans: 2:8:2 is 2, 4, 6)."
            ) from None
        if len(bits) == 1:
            out.add(bits[0])
            continue
        if len(bits) > 3:
            raise UserError(f"cannot read {what} {part!r}; use A:B[:STEP].")
        lo, hi, step = bits[0], bits[1], bits[2] if len(bits) == 3 else 1
        if step < 1 or hi <= lo:
            raise UserError(
                f"{what} range {part!r} is empty; write A:B[:STEP] with A < B and STEP >= 1 (end exclusive)."
            )
        values = range(lo, hi, step)
        if was_inclusive and (hi - lo) % step == 0:
            _explain_range_change(part, what, lo, hi, step, list(values))
        out.update(values)
    if not out:
        raise UserError(f"no {what} given.")
    if minimum is not None and min(out) < minimum:
        raise UserError(f"{what} needs integers >= {minimum}, got {text!r}.")
    return sorted(out)


def _explain_range_change(part: str, what: str, lo: int, hi: int, step: int, values: list[int]) -> None:
    shown = lambda v: ", ".join(map(str, v)) if len(v) <= 4 else f"{v[0]}, {v[1]}, ..., {v[-1]}"  # noqa: E731
    before = shown(list(range(lo, hi + 1, step)))
    if step > 1:
        raise UserError(
            f"{what} {part}: ranges now exclude their end, as in plans, so this no longer includes "
            f"{hi} (it meant {before}; now {shown(values)}). Write {lo}:{hi + 1}:{step} for "
            f"{before}, or {lo}:{hi - 1}:{step} for {shown(values)}."
        )
    import warnings

    warnings.warn(
        f"{what} {part} means {shown(values)}: ranges now exclude their end, as in plans "
        f"(before, it also included {hi}; write {lo}:{hi + 1} for that).",
        RangeChangeWarning,
        stacklevel=3,
    )
