"""The search space of `truedepth search`: candidate elements (a group of consecutive layers run in parallel,
or a skipped layer), the plan a set of them makes, and the depths they can reach."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ...core.plan import Plan, PlanError, Step
from ...utils.errors import UserError


# ---------------------------------------------------------------------------------------------
# Search space: candidate elements (a group of consecutive layers run in parallel, or a skip)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Element:
    """One change to the stack: `size` consecutive layers from `start` in parallel, or a skip."""

    start: int
    size: int
    kind: str  # "parallel" | "skip"

    @property
    def layers(self) -> range:
        return range(self.start, self.start + self.size)

    @property
    def reduction(self) -> int:
        """Layers of depth this element removes."""
        return self.size - 1 if self.kind == "parallel" else self.size

    def step(self) -> Step:
        if self.kind == "parallel":
            return Step("parallel", self.start, self.start + self.size, self.size)
        return Step("skip", self.start, self.start + self.size)

    def shifted(self, by: int) -> Element:
        return Element(self.start + by, self.size, self.kind)

    def __str__(self) -> str:
        return str(self.step())


def candidate_elements(num_layers: int, max_group: int = 3, allow_skip: bool = False) -> list[Element]:
    """Every group of 2..max_group consecutive layers, plus every single-layer skip if allowed."""
    out = [Element(a, g, "parallel") for g in range(2, max_group + 1) for a in range(num_layers - g + 1)]
    if allow_skip:
        out += [Element(i, 1, "skip") for i in range(num_layers)]
    return out


def fits(chosen: Iterable[Element], element: Element, num_layers: int | None = None) -> bool:
    """True if `element` uses no layer already used by `chosen` (and lies inside the stack)."""
    if num_layers is not None and (element.start < 0 or element.start + element.size > num_layers):
        return False
    used = {i for e in chosen for i in e.layers}
    return not used.intersection(element.layers)


def plan_of(elements: Iterable[Element]) -> Plan:
    """The Plan of a set of elements; neighbouring groups of one size share a step
    (parallel=20:24 rather than parallel=20:22,parallel=22:24), neighbouring skips too."""
    steps: list[Step] = []
    for e in sorted(elements):
        last = steps[-1] if steps else None
        same = (
            last is not None
            and last.end == e.start
            and last.kind == e.kind
            and (e.kind == "skip" or last.group == e.size)
        )
        if same:
            steps[-1] = Step(last.kind, last.start, e.start + e.size, last.group)
        else:
            steps.append(e.step())
    return Plan(tuple(steps))


def elements_of(plan: Plan, num_layers: int) -> list[Element]:
    """Inverse of plan_of for plans made of parallel groups and skips."""
    out: list[Element] = []
    for step in plan.steps:
        if step.kind == "parallel":
            out += [Element(g[0], len(g), "parallel") for g in step.groups()]
        elif step.kind == "skip":
            out += [Element(i, 1, "skip") for i in step.layers]
        elif step.kind != "keep":
            raise PlanError(f"step '{step}': the search only handles parallel groups and skips.")
    return out


def reachable(chosen: Iterable[Element], num_layers: int, max_group: int, allow_skip: bool) -> int:
    """Largest further depth reduction the layers not used by `chosen` still allow."""
    used = {i for e in chosen for i in e.layers}
    total, run = 0, 0
    for i in range(num_layers + 1):
        if i < num_layers and i not in used:
            run += 1
            continue
        whole, rest = divmod(run, max_group)
        total += run if allow_skip else whole * (max_group - 1) + max(rest - 1, 0)
        run = 0
    return total


def reduction_of(elements: Iterable[Element]) -> int:
    return sum(e.reduction for e in elements)


def max_reduction(num_layers: int, max_group: int, allow_skip: bool) -> int:
    """Largest depth reduction the search space can reach."""
    if allow_skip:
        return num_layers - 1
    whole, rest = divmod(num_layers, max_group)
    return whole * (max_group - 1) + max(rest - 1, 0)


def target_reductions(
    num_layers: int, depths: Sequence[int] | None, reductions: Sequence[int] | None, max_group: int, allow_skip: bool
) -> list[int]:
    """Depth reductions to search for, checked against what the search space can reach."""
    if (depths is None) == (reductions is None):
        raise UserError("give exactly one of --target-depth D or --reduce K.")
    wanted = [num_layers - d for d in depths] if depths is not None else list(reductions)
    limit = max_reduction(num_layers, max_group, allow_skip)
    for k in wanted:
        depth = num_layers - k
        if k < 1 or depth < 1:
            raise UserError(
                f"target depth {depth} (reduce {k}) is outside 1..{num_layers - 1}: the model "
                f"has {num_layers} layers; pick a target depth below {num_layers}."
            )
        if k > limit:
            how = "add --allow-skip" if not allow_skip else "pick a larger depth"
            if not allow_skip and max_group < 3:
                how = "use --max-group 3 or --allow-skip"
            raise UserError(
                f"target depth {depth} cannot be reached with groups of at most {max_group} "
                f"layers{' and skips' if allow_skip else ''} (lowest reachable: "
                f"{num_layers - limit}); {how}."
            )
    return sorted(set(wanted))
