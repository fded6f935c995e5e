"""The search itself: costs of candidates alone, beam build, local refinement, final choice on fresh
windows, and the paper's single contiguous range as a baseline (steps 3-7 of `truedepth search --help`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...core.plan import Plan
from ...utils.errors import UserError
from .scoring import PlanScorer
from .space import Element, candidate_elements, fits, plan_of, reachable, target_reductions


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------
@dataclass
class Options:
    max_group: int = 3
    allow_skip: bool = False
    beam: int = 2
    shortlist: int = 6
    refine_rounds: int = 1
    screen: int | None = None  # keep this many candidates by cosine proxy before measuring alone
    budget: int | None = None  # soft cap on full-plan evaluations after the proxies
    progress: bool = True


@dataclass
class Found:
    """The best plan found for one depth reduction."""

    reduction: int
    depth: int
    plan: Plan
    objective: float
    built_objective: float  # before refinement
    evals: int  # plan evaluations a single-target run would have needed
    layer_runs: int
    seconds: float
    # set by select_on_fresh_windows: the search's own pick, the chosen plan's objective on the
    # selection windows, and every finalist with both objectives
    search_plan: Plan | None = None
    selection_objective: float | None = None
    finalists: list[dict] = field(default_factory=list)
    selection_passes: int = 0
    selection_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {
            "depth": self.depth,
            "reduction": self.reduction,
            "plan": self.plan.to_dict(),
            "objective": self.objective,
            "objective_before_refinement": self.built_objective,
            "forward_passes": self.evals,
            "layer_runs": self.layer_runs,
            "seconds": round(self.seconds, 2),
        }
        if self.search_plan is not None:
            out |= {
                "search_plan": str(self.search_plan),
                "selection_objective": self.selection_objective,
                "finalists": self.finalists,
                "selection_passes": self.selection_passes,
                "selection_seconds": round(self.selection_seconds, 2),
            }
        return out


@dataclass
class SearchResult:
    objective: str
    base_objective: float
    num_layers: int
    found: dict[int, Found]  # by reduction
    proxies: list[dict]  # per candidate element: cosine proxy and cost alone
    trajectory: list[dict] = field(default_factory=list)  # best objective per depth level, in order
    evals: int = 0
    layer_runs: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "base_objective": self.base_objective,
            "num_layers": self.num_layers,
            "found": [f.to_dict() for _, f in sorted(self.found.items())],
            "proxies": self.proxies,
            "trajectory": self.trajectory,
            "forward_passes": self.evals,
            "layer_runs": self.layer_runs,
            "seconds": round(self.seconds, 2),
        }


class _Clock:
    """Forward passes, decoder layers run and seconds, as snapshots of the scorer."""

    def __init__(self, scorer: PlanScorer) -> None:
        self.scorer, self.t0 = scorer, time.perf_counter()

    def now(self) -> tuple[int, int, float]:
        return self.scorer.evals, self.scorer.layer_runs, time.perf_counter() - self.t0


def search(scorer: PlanScorer, reductions: Sequence[int], options: Options | None = None) -> SearchResult:
    """Find, for each depth reduction in `reductions`, a plan of exactly that reduction with a low
    objective. See the module docstring for the algorithm."""
    opt = options or Options()
    reductions = sorted(set(reductions))
    L = scorer.num_layers
    target_reductions(L, None, reductions, opt.max_group, opt.allow_skip)  # raises on bad targets
    clock = _Clock(scorer)
    elements = candidate_elements(L, opt.max_group, opt.allow_skip)
    cosine = {e: scorer.cosine_proxy(e) for e in elements}
    screened = sorted(elements, key=lambda e: cosine[e])[: opt.screen] if opt.screen else elements
    alone = measure_alone(scorer, screened, opt.progress)
    ranked = sorted(alone, key=lambda e: alone[e])  # cheapest first: the order candidates are tried
    after_proxies = clock.now()
    levels, level_clock = beam_build(scorer, ranked, max(reductions), opt, after_proxies[0])
    found: dict[int, Found] = {}
    for k in reductions:
        built_obj, built = levels[k][0]
        t_before = clock.now()
        obj, best = refine(scorer, built, ranked, opt, after_proxies[0], label=f"refine depth {L - k}")
        t_after = clock.now()
        # what a run with this single target would have cost: proxies, beam up to level k, refinement
        evals, runs, secs = (after_proxies[i] + level_clock[k][i] + t_after[i] - t_before[i] for i in range(3))
        found[k] = Found(k, L - k, plan_of(best), obj, built_obj, evals, runs, secs)
    total = clock.now()
    proxies = [
        {
            "element": str(e),
            "layers": list(e.layers),
            "kind": e.kind,
            "cosine_proxy": cosine[e],
            "cost_alone": alone.get(e),
        }
        for e in elements
    ]
    trajectory = [
        {"depth": L - r, "reduction": r, "objective": levels[r][0][0], "plan": str(plan_of(levels[r][0][1]))}
        for r in sorted(levels)
        if levels[r] and r > 0
    ]
    return SearchResult(scorer.objective, scorer.base, L, found, proxies, trajectory, total[0], total[1], total[2])


def measure_alone(scorer: PlanScorer, elements: Sequence[Element], progress: bool = True) -> dict[Element, float]:
    """Objective of the plan made of each element alone (one forward each, late layers cheaper)."""
    from tqdm.auto import tqdm

    out: dict[Element, float] = {}
    bar = tqdm(elements, desc="cost of each group alone", unit="plan", disable=not progress, leave=False)
    for e in bar:
        out[e] = scorer.score([e])
        best = min(out, key=out.get)
        bar.set_postfix_str(f"best {best} {out[best]:.4g}")
    return out


def _shortlist(
    chosen: Sequence[Element], ranked: Sequence[Element], room: int, size: int, num_layers: int, opt: Options
) -> list[Element]:
    """The `size` cheapest candidates (by cost alone) that fit next to `chosen` within `room`
    and leave enough free layers to remove the rest of `room` (e.g. pairs that tile the stack)."""
    out = []
    for e in ranked:
        if (
            e.reduction <= room
            and fits(chosen, e, num_layers)
            and reachable((*chosen, e), num_layers, opt.max_group, opt.allow_skip) >= room - e.reduction
        ):
            out.append(e)
            if len(out) == size:
                break
    return out


def _over_budget(scorer: PlanScorer, opt: Options, start_evals: int) -> bool:
    return opt.budget is not None and scorer.evals - start_evals >= opt.budget


def beam_build(
    scorer: PlanScorer, ranked: Sequence[Element], top: int, opt: Options, start_evals: int
) -> tuple[dict[int, list], dict[int, tuple[int, int, float]]]:
    """Beam search level by level of depth reduction, from the original model to `top`.

    Level r keeps the `opt.beam` best plans of reduction r; each is extended by its
    `opt.shortlist` cheapest compatible candidates, every extension evaluated in full. Returns
    the sorted levels [(objective, elements)] and, per level, (evals, layer runs, seconds) spent
    until that level was complete. Over budget, a level stops at its first plan."""
    from tqdm.auto import tqdm

    L = scorer.num_layers
    t0 = time.perf_counter()
    evals0, runs0 = scorer.evals, scorer.layer_runs
    levels: dict[int, list] = {r: [] for r in range(top + 1)}
    levels[0] = [(scorer.base, ())]
    seen: set[tuple] = {()}
    done: dict[int, tuple[int, int, float]] = {0: (0, 0, 0.0)}
    bar = tqdm(total=top, desc="beam build", unit="level", disable=not opt.progress, leave=False)
    for r in range(top):
        levels[r] = sorted(levels[r], key=lambda t: t[0])[: opt.beam]
        for _, chosen in levels[r]:
            scorer.keep_states(chosen)  # its extensions start where they leave it
            for e in _shortlist(chosen, ranked, top - r, opt.shortlist, L, opt):
                if levels[r + 1] and _over_budget(scorer, opt, start_evals):
                    break  # over budget: one plan per level, enough to reach the target
                new = tuple(sorted(chosen + (e,)))
                if new in seen:
                    continue
                seen.add(new)
                levels[r + e.reduction].append((scorer.score(new), new))
        nxt = sorted(levels[r + 1], key=lambda t: t[0])
        if not nxt:
            raise UserError(
                f"the beam found no plan of depth {L - r - 1}: too few candidates fit (raise --shortlist or --screen)."
            )
        done[r + 1] = (scorer.evals - evals0, scorer.layer_runs - runs0, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix_str(f"depth {L - r - 1}: {nxt[0][0]:.4g} {plan_of(nxt[0][1])}")
        if opt.progress:  # the objective along the way, kept on screen
            tqdm.write(
                f"depth {L - r - 1}: {scorer.objective} {nxt[0][0]:.4f}  {plan_of(nxt[0][1])}  ({scorer.evals} passes)"
            )
    bar.close()
    levels[top] = sorted(levels[top], key=lambda t: t[0])[: opt.beam]
    return levels, done


def neighbours(chosen: Sequence[Element], ranked: Sequence[Element], size: int, num_layers: int) -> list[tuple]:
    """Plans that swap one element of `chosen` for another of the same depth reduction: the
    `size` cheapest candidates that fit, or the same element shifted by one layer."""
    size = max(2, size // 2)  # swaps per element: half the shortlist keeps a round near 5 passes per element
    out: list[tuple] = []
    for e in chosen:
        rest = tuple(x for x in chosen if x != e)
        options = [c for c in ranked if c.reduction == e.reduction and c != e][: size * 4]
        options = [c for c in options if fits(rest, c, num_layers)][:size]
        options += [s for s in (e.shifted(-1), e.shifted(1)) if s not in options and fits(rest, s, num_layers)]
        out += [tuple(sorted(rest + (c,))) for c in options]
    return list(dict.fromkeys(out))


def refine(
    scorer: PlanScorer,
    chosen: Sequence[Element],
    ranked: Sequence[Element],
    opt: Options,
    start_evals: int,
    label: str = "refine",
) -> tuple[float, tuple]:
    """Local search: repeatedly take the best single swap (see `neighbours`) while it improves."""
    from tqdm.auto import tqdm

    best = tuple(sorted(chosen))
    best_obj = scorer.score(best)
    for _ in range(opt.refine_rounds):
        if _over_budget(scorer, opt, start_evals):
            break
        improved = False
        scorer.keep_states(best)  # a swap starts at the first layer it changes
        cands = neighbours(best, ranked, opt.shortlist, scorer.num_layers)
        for cand in tqdm(cands, desc=label, unit="plan", disable=not opt.progress, leave=False):
            if _over_budget(scorer, opt, start_evals):
                break
            obj = scorer.score(cand)
            if obj < best_obj:
                best_obj, best, improved = obj, cand, True
        if not improved:
            break
    return best_obj, best


def select_on_fresh_windows(
    scorer: PlanScorer, selector: PlanScorer, found: dict[int, Found], finalists: int, progress: bool = True
) -> None:
    """Final choice per depth, against the winner's curse: the `finalists` plans of that depth with
    the best search objective, among every plan the search scored (the beam, the swaps, and the
    contiguous ranges when --baseline ran first), are scored again on `selector`'s windows, which
    the search never saw; the best there replaces `found[k]` (in place). A plan chosen among many
    on one sample is biased low on it; a fresh sample ranks the finalists without that bias."""
    from tqdm.auto import tqdm

    L = scorer.num_layers
    by_reduction: dict[int, list[tuple[float, str]]] = {}
    for key, obj in scorer.scored().items():
        by_reduction.setdefault(L - Plan.parse(key).depth(L), []).append((obj, key))
    for k, f in tqdm(
        sorted(found.items()), desc="final choice on fresh windows", unit="depth", disable=not progress, leave=False
    ):
        t0 = selector.evals, selector.layer_runs, time.perf_counter()
        pool = sorted(by_reduction.get(k, []))[:finalists]
        rows = [{"plan": key, "objective": obj, "selection_objective": selector.score(key)} for obj, key in pool]
        best = min(rows, key=lambda r: r["selection_objective"])
        f.search_plan, f.plan, f.objective = f.plan, Plan.parse(best["plan"]), best["objective"]
        f.selection_objective, f.finalists = best["selection_objective"], rows
        # kept apart from the search's counts: these passes run over the (larger) selection batch
        f.selection_passes = selector.evals - t0[0]
        f.selection_seconds = time.perf_counter() - t0[2]


def contiguous_baseline(scorer: PlanScorer, reductions: Sequence[int], progress: bool = True) -> dict[int, dict]:
    """The paper's scheme: for each reduction K, the single range of K consecutive pairs
    (parallel=s:s+2K) with the best calibration objective over every start s."""
    from tqdm.auto import tqdm

    L = scorer.num_layers
    out: dict[int, dict] = {}
    for k in sorted(set(reductions)):
        if 2 * k > L:
            continue
        t0 = time.perf_counter()
        tried = []
        for s in tqdm(
            range(L - 2 * k + 1), desc=f"baseline depth {L - k}", unit="plan", disable=not progress, leave=False
        ):
            plan = Plan.parallel(s, s + 2 * k)
            tried.append({"start": s, "plan": str(plan), "objective": scorer.score(plan)})
        best = min(tried, key=lambda t: t["objective"])
        out[k] = {
            "depth": L - k,
            "reduction": k,
            "plan": Plan.parse(best["plan"]).to_dict(),
            "objective": best["objective"],
            "tried": tried,
            "forward_passes": len(tried),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return out
