"""Search for the layer groups that cost least at a target depth.

The paper runs ONE contiguous range of layer pairs in parallel. This command searches a larger
space: any set of disjoint groups of 2 or 3 consecutive layers anywhere in the stack (several
ranges), optionally mixed with skipped layers (--allow-skip), reaching exactly the target depth.
A group of g layers removes g-1 layers of depth, a skipped layer removes one.

Objective, measured on calibration text that differs from the reporting text (default: the five
training novels for calibration, the held-out novel for the report):
  ppl  perplexity of the candidate on the calibration windows
  kl   mean KL divergence from the original model's next-token distribution (nats/token)

Algorithm (cost counted in forward passes over the calibration batch):
  1. one forward of the original model records every layer's input (and the attention inputs);
     a candidate is evaluated by re-running only the layers from the first one it changes,
     so late-layer candidates cost a fraction of a forward (exact same math as the fused model)
  2. zero-cost proxy: cosine similarity between the input a layer sees in the plan and its
     original input (--screen N keeps the N most similar candidates for step 3)
  3. cost of each candidate group measured alone (one forward each)
  4. beam build (--beam, --shortlist): depth level by level, each kept plan is extended by the
     cheapest compatible candidates (ranked by their cost alone) and every extension evaluated
  5. refinement by local swaps (--refine-rounds): replace one group by another group or skip of
     the same size (or the same group shifted by one layer); keep the best improvement
  6. optionally (--baseline) the paper's scheme: for each depth, the best single contiguous range
     of pairs over every start position
  7. final choice (--select-windows, --finalists): the best plans of each depth among all those
     scored (the contiguous ranges included) are scored again on calibration windows the search
     never saw, and the best there is kept: choosing among many plans on one sample favours the
     luckiest; a fresh sample does not
  8. optionally (--report) held-out perplexity of the final plans, computed on the real fused
     model (apply_plan)

Examples:
  truedepth search --target-depth 26
  truedepth search --target-depth 28..22 --baseline --plot search.png --out search.json
  truedepth search --reduce 4 --objective kl --allow-skip --max-group 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .plan import Block, Plan, Step

OBJECTIVES = ("ppl", "kl")


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

    def shifted(self, by: int) -> "Element":
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
        same = last is not None and last.end == e.start and last.kind == e.kind and \
            (e.kind == "skip" or last.group == e.size)
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
            raise ValueError(f"step '{step}': the search only handles parallel groups and skips.")
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


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def parse_int_list(text: str, what: str) -> list[int]:
    """'26', '28,26,24', '28..22' or '22..28' -> list of ints in the order written (ranges inclusive)."""
    values: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if ".." in part:
                a, b = (int(x) for x in part.split(".."))
                values += list(range(a, b - 1, -1) if a > b else range(a, b + 1))
            elif part:
                values.append(int(part))
    except ValueError:
        raise ValueError(f"cannot read {what} {text!r}; write a number (26), a list (28,26,24) "
                         f"or an inclusive range (28..22).") from None
    if not values:
        raise ValueError(f"{what} is empty; write a number (26), a list (28,26,24) or a range (28..22).")
    return list(dict.fromkeys(values))


def target_reductions(num_layers: int, depths: Sequence[int] | None, reductions: Sequence[int] | None,
                      max_group: int, allow_skip: bool) -> list[int]:
    """Depth reductions to search for, checked against what the search space can reach."""
    if (depths is None) == (reductions is None):
        raise ValueError("give exactly one of --target-depth D or --reduce K.")
    wanted = [num_layers - d for d in depths] if depths is not None else list(reductions)
    limit = max_reduction(num_layers, max_group, allow_skip)
    for k in wanted:
        depth = num_layers - k
        if k < 1 or depth < 1:
            raise ValueError(f"target depth {depth} (reduce {k}) is outside 1..{num_layers - 1}: the model "
                             f"has {num_layers} layers; pick a target depth below {num_layers}.")
        if k > limit:
            how = "add --allow-skip" if not allow_skip else "pick a larger depth"
            if not allow_skip and max_group < 3:
                how = "use --max-group 3 or --allow-skip"
            raise ValueError(f"target depth {depth} cannot be reached with groups of at most {max_group} "
                             f"layers{' and skips' if allow_skip else ''} (lowest reachable: "
                             f"{num_layers - limit}); {how}.")
    return sorted(set(wanted))


# ---------------------------------------------------------------------------------------------
# Calibration batch
# ---------------------------------------------------------------------------------------------
def calibration_ids(tokenizer: Any, text: str, windows: int = 16, length: int = 512) -> Any:
    """`windows` windows of `length` tokens spread evenly over `text` (deterministic), as a
    (windows, length) LongTensor. Spreading them samples many chapters with few tokens."""
    import torch

    if windows < 1 or length < 2:
        raise ValueError(f"need at least 1 calibration window of at least 2 tokens (got {windows} x {length}); "
                         "pass e.g. --calib-windows 8 --calib-length 256.")
    chars = length * 8  # Austen-like English averages ~4-5 characters per token: 8 leaves spare
    if len(text) < chars:
        raise ValueError(f"the calibration text has {len(text)} characters, too short for windows of {length} "
                         "tokens; pass a longer --calib text or a smaller --calib-length.")
    rows = []
    for k in range(windows):
        start = (len(text) - chars) * k // max(windows - 1, 1)
        start = _word_start(text, start)
        ids = tokenizer(text[start:start + chars], add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            raise ValueError(f"calibration window {k} holds only {len(ids)} tokens, fewer than {length}; "
                             "pass a smaller --calib-length or a longer --calib text.")
        rows.append(list(ids[:length]))
    return torch.tensor(rows, dtype=torch.long)


def split_calibration_ids(tokenizer: Any, text: str, windows: int, select: int, length: int) -> tuple[Any, Any]:
    """Two disjoint sets of windows of `text`: `windows` for the search and `select` for the final
    choice among finalists (None when select is 0). All windows are spread evenly over the text
    together and dealt out alternately, so both sets sample the whole text and never share a
    window (they overlap only when the text is shorter than all windows end to end)."""
    ids = calibration_ids(tokenizer, text, windows + select, length)
    if not select:
        return ids, None
    picked = {int((i + 0.5) * (windows + select) / select) for i in range(select)}
    chosen = [i for i in range(windows + select) if i in picked]
    rest = [i for i in range(windows + select) if i not in picked]
    return ids[rest], ids[chosen]


def _word_start(text: str, pos: int) -> int:
    """First position at or after `pos` that starts a word (windows never open mid-word)."""
    if pos == 0:
        return 0
    nxt = text.find(" ", pos)
    return pos if nxt < 0 else nxt + 1


# ---------------------------------------------------------------------------------------------
# Scoring plans on the calibration batch
# ---------------------------------------------------------------------------------------------
class PlanScorer:
    """Objective of plans on a fixed calibration batch, from the ORIGINAL model's layers.

    One forward of the original model records the input of every layer and the keyword
    arguments (attention mask, rotary embeddings) each layer receives. A plan is then evaluated
    from the first layer it changes, with its parallel groups computed from the definition
        h = x + sum_i Attn_i(Norm_i(x)),   out = h + sum_i MLP_i(Norm'_i(h))
    which is what the fused wide layer of `apply_plan` computes (up to float rounding), so the
    search never copies or rebuilds the model. Results are memoised per plan.
    """

    def __init__(self, model: Any, input_ids: Any, objective: str = "ppl") -> None:
        import torch

        from .transform import check_supported, current_plan, decoder_layers

        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}.")
        previous = current_plan(model.config)
        if previous is not None and not previous.is_identity:
            raise ValueError(f"the model was already transformed with plan '{previous}'; the search needs the "
                             "original model (plans refer to its layers): load it without a plan.")
        check_supported(model)
        self.model = model
        self.objective = objective
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        device = next(model.parameters()).device
        self.input_ids = input_ids.to(device)
        self.evals = 1  # forward passes over the calibration batch, the recording pass included
        self.layer_runs = self.num_layers  # decoder layers run in those passes (a group of g counts g)
        self._cache: dict[str, float] = {}
        with torch.no_grad():
            self.inputs, self.kwargs = self._record_base_pass()
            self.base = self._objective(self.inputs[-1])
        self._cache[str(Plan(()))] = self.base

    # ---- the original model's pass ------------------------------------------------------------
    def _record_base_pass(self) -> tuple[list[Any], list[dict]]:
        inputs: list[Any] = [None] * (self.num_layers + 1)
        kwargs: list[dict] = [{}] * self.num_layers
        handles = []

        def recorder(i: int) -> Callable:
            def hook(module: Any, args: tuple, kw: dict) -> None:
                inputs[i] = args[0] if args else kw["hidden_states"]
                if i < len(kwargs):
                    kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            return hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(recorder(i), with_kwargs=True))
        handles.append(self.model.model.norm.register_forward_pre_hook(recorder(self.num_layers), with_kwargs=True))
        try:
            self.model.model(input_ids=self.input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in inputs):
            raise RuntimeError("could not record the layer inputs of the model: its decoder layers or final norm "
                               "were not called as expected (is this a standard HF decoder-only model?).")
        return inputs, kwargs

    # ---- objective ------------------------------------------------------------------------------
    def _log_probs(self, hidden: Any) -> Any:
        """Next-token log-probabilities of one window from its final (pre-norm) hidden states."""
        import torch

        logits = self.model.lm_head(self.model.model.norm(hidden[:-1])).float()
        return torch.log_softmax(logits, dim=-1)

    def _window_losses(self, hidden: Any) -> Any:
        """Per window: mean negative log-likelihood (ppl) or mean KL(original || candidate) per
        predicted token, as a float64 tensor."""
        import torch

        out = []
        for b in range(hidden.shape[0]):  # one window at a time: logits are tokens x vocab floats
            logp = self._log_probs(hidden[b])
            if self.objective == "ppl":
                out.append(float(-logp.gather(1, self.input_ids[b, 1:, None]).mean()))
            else:  # the original distribution is recomputed from its final hidden states: one more
                # head product per window, instead of keeping tokens x vocab floats in memory
                base = self._log_probs(self.inputs[-1][b])
                out.append(float((base.exp() * (base - logp)).sum(-1).mean()))
        return torch.tensor(out, dtype=torch.float64)

    def _objective(self, hidden: Any) -> float:
        """Calibration perplexity, or mean KL(original || candidate) per predicted token (windows
        have equal lengths, so the mean over windows is the mean over tokens)."""
        mean = float(self._window_losses(hidden).mean())
        return math.exp(mean) if self.objective == "ppl" else mean

    def _final_hidden(self, plan: Plan) -> Any:
        """Final (pre-norm) hidden states of `plan`, re-running only the layers from the first one
        it changes; counted as one forward pass."""
        import torch

        blocks = plan.blocks(self.num_layers)
        first = first_changed_block(blocks)
        with torch.no_grad():
            x = self.inputs[first]
            for block in blocks[first:]:
                x = self._run_block(block, x)
                self.layer_runs += len(block.layers)
        self.evals += 1
        return x

    # ---- plans ------------------------------------------------------------------------------------
    @staticmethod
    def _as_plan(plan: Any) -> Plan:
        if not isinstance(plan, (Plan, str)):
            plan = plan_of(plan)
        return plan if isinstance(plan, Plan) else Plan.parse(plan)

    def score(self, plan: Any) -> float:
        """Objective of `plan` (a Plan, plan string or list of Elements) on the calibration batch."""
        import torch

        plan = self._as_plan(plan)
        key = str(plan)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self._objective(self._final_hidden(plan))
        return self._cache[key]

    def window_losses(self, plan: Any) -> Any:
        """Per-window objective of `plan` (mean NLL or KL per token; not memoised): what paired
        comparisons of two plans need, since most of the variance between windows is shared."""
        import torch

        with torch.no_grad():
            return self._window_losses(self._final_hidden(self._as_plan(plan)))

    def scored(self) -> dict[str, float]:
        """Every plan scored so far (plan string -> objective), the original model included."""
        return dict(self._cache)

    def _run_block(self, block: Block, x: Any) -> Any:
        kw = self.kwargs[block.layers[0]]
        if block.kind == "keep":
            out = self.layers[block.layers[0]](x, **kw)
            return out[0] if isinstance(out, tuple) else out
        if block.kind != "parallel":
            raise ValueError(f"the search scorer handles parallel groups and skips, not '{block.kind}'.")
        members = [self.layers[i] for i in block.layers]
        h = x + sum(m.self_attn(hidden_states=m.input_layernorm(x), **kw)[0] for m in members)
        return h + sum(m.mlp(m.post_attention_layernorm(h)) for m in members)

    def cosine_proxy(self, element: Element) -> float:
        """Zero-forward proxy of an element's cost: how far the inputs its layers see under the
        plan are from their original inputs (1 - mean cosine similarity, summed over layers).

        In a parallel group every member reads the group's input x_a instead of its own x_i; a
        skipped layer's successor reads x_i instead of x_{i+1}. Near-identical hidden states mean
        the change costs little."""
        if element.kind == "skip":
            pairs = [(element.start, element.start + 1)]
        else:
            pairs = [(element.start, i) for i in element.layers[1:]]
        return sum(1.0 - self._mean_cosine(self.inputs[a], self.inputs[b]) for a, b in pairs)

    def _mean_cosine(self, a: Any, b: Any) -> float:
        import torch

        return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def first_changed_block(blocks: Sequence[Block]) -> int:
    """Index of the first block that is not the original layer at that position: everything
    before it equals the original model, so its input is the recorded hidden state."""
    for k, block in enumerate(blocks):
        if block != Block("keep", (k,)):
            return k
    return len(blocks)


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
        out = {"depth": self.depth, "reduction": self.reduction, "plan": self.plan.to_dict(),
               "objective": self.objective, "objective_before_refinement": self.built_objective,
               "forward_passes": self.evals, "layer_runs": self.layer_runs, "seconds": round(self.seconds, 2)}
        if self.search_plan is not None:
            out |= {"search_plan": str(self.search_plan), "selection_objective": self.selection_objective,
                    "finalists": self.finalists, "selection_passes": self.selection_passes,
                    "selection_seconds": round(self.selection_seconds, 2)}
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
        return {"objective": self.objective, "base_objective": self.base_objective, "num_layers": self.num_layers,
                "found": [f.to_dict() for _, f in sorted(self.found.items())], "proxies": self.proxies,
                "trajectory": self.trajectory, "forward_passes": self.evals, "layer_runs": self.layer_runs,
                "seconds": round(self.seconds, 2)}


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
    proxies = [{"element": str(e), "layers": list(e.layers), "kind": e.kind, "cosine_proxy": cosine[e],
                "cost_alone": alone.get(e)} for e in elements]
    trajectory = [{"depth": L - r, "reduction": r, "objective": levels[r][0][0], "plan": str(plan_of(levels[r][0][1]))}
                  for r in sorted(levels) if levels[r] and r > 0]
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


def _shortlist(chosen: Sequence[Element], ranked: Sequence[Element], room: int, size: int,
               num_layers: int, opt: Options) -> list[Element]:
    """The `size` cheapest candidates (by cost alone) that fit next to `chosen` within `room`
    and leave enough free layers to remove the rest of `room` (e.g. pairs that tile the stack)."""
    out = []
    for e in ranked:
        if e.reduction <= room and fits(chosen, e, num_layers) and \
                reachable((*chosen, e), num_layers, opt.max_group, opt.allow_skip) >= room - e.reduction:
            out.append(e)
            if len(out) == size:
                break
    return out


def _over_budget(scorer: PlanScorer, opt: Options, start_evals: int) -> bool:
    return opt.budget is not None and scorer.evals - start_evals >= opt.budget


def beam_build(scorer: PlanScorer, ranked: Sequence[Element], top: int, opt: Options,
               start_evals: int) -> tuple[dict[int, list], dict[int, tuple[int, int, float]]]:
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
            raise RuntimeError(f"the beam found no plan of depth {L - r - 1}: too few candidates fit "
                               "(raise --shortlist or --screen).")
        done[r + 1] = (scorer.evals - evals0, scorer.layer_runs - runs0, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix_str(f"depth {L - r - 1}: {nxt[0][0]:.4g} {plan_of(nxt[0][1])}")
        if opt.progress:  # the objective along the way, kept on screen
            tqdm.write(f"depth {L - r - 1}: {scorer.objective} {nxt[0][0]:.4f}  {plan_of(nxt[0][1])}  "
                       f"({scorer.evals} passes)")
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


def refine(scorer: PlanScorer, chosen: Sequence[Element], ranked: Sequence[Element], opt: Options,
           start_evals: int, label: str = "refine") -> tuple[float, tuple]:
    """Local search: repeatedly take the best single swap (see `neighbours`) while it improves."""
    from tqdm.auto import tqdm

    best = tuple(sorted(chosen))
    best_obj = scorer.score(best)
    for _ in range(opt.refine_rounds):
        if _over_budget(scorer, opt, start_evals):
            break
        improved = False
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


def select_on_fresh_windows(scorer: PlanScorer, selector: PlanScorer, found: dict[int, Found], finalists: int,
                            progress: bool = True) -> None:
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
    for k, f in tqdm(sorted(found.items()), desc="final choice on fresh windows", unit="depth",
                     disable=not progress, leave=False):
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
        for s in tqdm(range(L - 2 * k + 1), desc=f"baseline depth {L - k}", unit="plan",
                      disable=not progress, leave=False):
            plan = Plan.parallel(s, s + 2 * k)
            tried.append({"start": s, "plan": str(plan), "objective": scorer.score(plan)})
        best = min(tried, key=lambda t: t["objective"])
        out[k] = {"depth": L - k, "reduction": k, "plan": Plan.parse(best["plan"]).to_dict(),
                  "objective": best["objective"], "tried": tried, "forward_passes": len(tried),
                  "seconds": round(time.perf_counter() - t0, 2)}
    return out


# ---------------------------------------------------------------------------------------------
# Reporting: held-out perplexity from the real fused model, plot
# ---------------------------------------------------------------------------------------------
def held_out_perplexity(model: Any, tokenizer: Any, plan: Plan, text: str, tokens: int, window: int) -> float:
    """Perplexity of `plan` applied for real (apply_plan on a copy) on `text`."""
    from .perplexity import perplexity
    from .transform import apply_plan

    candidate = copy.deepcopy(model)
    try:
        if not plan.is_identity:
            apply_plan(candidate, plan)
        return perplexity(candidate, tokenizer, text, tokens=tokens, window=window, progress=False)["perplexity"]
    finally:
        del candidate


def report_held_out(model: Any, tokenizer: Any, rows: list[dict], text: str, tokens: int, window: int,
                    progress: bool = True) -> None:
    """Add 'heldout_ppl' to every row ({'plan': plan dict, ...}) in place."""
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="held-out perplexity", unit="plan", disable=not progress, leave=False):
        row["heldout_ppl"] = held_out_perplexity(model, tokenizer, Plan.from_dict(row["plan"]), text, tokens, window)


def plot(summary: dict, path: str | Path) -> None:
    """Objective against depth for the found plans and the contiguous baseline (and held-out
    perplexity, when reported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    found = summary["found"]
    base = summary.get("baseline") or []
    held = any("heldout_ppl" in f for f in found)
    fig, axes = plt.subplots(1, 2 if held else 1, figsize=(11 if held else 6, 4.2), squeeze=False)
    panels = [("objective", f"calibration {summary['objective']}")] + ([("heldout_ppl", "held-out perplexity")]
                                                                        if held else [])
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot([f["depth"] for f in found], [f[key] for f in found], "o-", label="searched plans")
        if base:
            ax.plot([b["depth"] for b in base], [b[key] for b in base], "s--", label="best contiguous range of pairs")
        ref = summary.get("base_heldout_ppl") if key == "heldout_ppl" else summary["base_objective"]
        if ref is not None:
            ax.axhline(ref, color="gray", lw=0.8, ls=":", label=f"original model ({summary['num_layers']} layers)")
        ax.set_xlabel("depth (layers run one after another)")
        ax.set_ylabel(title)
        ax.invert_xaxis()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"truedepth search: {summary.get('model', '')}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

    add_model_arguments(parser, plan=False)
    target = parser.add_argument_group("target (exactly one)")
    target.add_argument("--target-depth", metavar="D", help="depth(s) to reach: 26, a list 28,26,24 or a range 28..22")
    target.add_argument("--reduce", metavar="K", help="layers of depth to remove instead: 4, a list or a range 2..8")
    space = parser.add_argument_group("search space and objective")
    space.add_argument("--objective", choices=OBJECTIVES, default="ppl",
                       help="ppl: calibration perplexity; kl: KL divergence from the original model. "
                            "Default: %(default)s")
    space.add_argument("--max-group", type=int, choices=(2, 3), default=3,
                       help="largest group of consecutive layers run in parallel. Default: %(default)s")
    space.add_argument("--allow-skip", action="store_true", help="also allow dropping single layers")
    space.add_argument("--calib", metavar="TEXT", default="austen-train",
                       help="calibration text: 'austen-train' (five novels, not the held-out one), "
                            "'other-domain', 'austen:<name>', a file, or a datasets name. Default: %(default)s")
    space.add_argument("--calib-windows", metavar="N", type=int, default=16, help="calibration windows. Default: %(default)s")
    space.add_argument("--calib-length", metavar="T", type=int, default=512, help="tokens per window. Default: %(default)s")
    space.add_argument("--select-windows", metavar="N", type=int, default=48,
                       help="more calibration windows, never seen by the search, that make the final choice among "
                            "the --finalists best plans of each depth (0: keep the search's own pick). "
                            "Default: %(default)s")
    space.add_argument("--finalists", metavar="F", type=int, default=6,
                       help="plans per depth re-scored on the --select-windows. Default: %(default)s")
    algo = parser.add_argument_group("algorithm and cost")
    algo.add_argument("--beam", metavar="B", type=int, default=2, help="plans kept per depth level. Default: %(default)s")
    algo.add_argument("--shortlist", metavar="M", type=int, default=6,
                      help="cheapest candidates tried per plan and step. Default: %(default)s")
    algo.add_argument("--refine-rounds", metavar="R", type=int, default=1, help="rounds of local swaps. Default: %(default)s")
    algo.add_argument("--screen", metavar="N", type=int, default=None,
                      help="measure alone only the N candidates with the best cosine proxy (default: all)")
    algo.add_argument("--budget", metavar="N", type=int, default=None,
                      help="soft cap on full-plan evaluations after the proxies; when reached, each depth level "
                           "still gets one evaluation so the target is reached (default: no cap)")
    out = parser.add_argument_group("comparison and output")
    out.add_argument("--baseline", action="store_true",
                     help="also find the best single contiguous range of pairs for each depth (the paper's scheme)")
    out.add_argument("--report", metavar="TEXT", default="default",
                     help="text to report held-out perplexity of the final plans on, with the fused model: "
                          "'default' (held-out novel), a file, ... or 'none'. Each plan is fused on a copy of "
                          "the model, so this needs room for two copies: for a large model pass 'none' and run "
                          "`truedepth eval --plan` on the plans afterwards. Default: %(default)s")
    out.add_argument("--report-tokens", metavar="N", type=int, default=8192, help="held-out tokens. Default: %(default)s")
    out.add_argument("--report-window", metavar="T", type=int, default=512, help="held-out window. Default: %(default)s")
    out.add_argument("--out", metavar="FILE", help="write the plans, objectives and counts as JSON to this file")
    out.add_argument("--plot", metavar="PNG", help="write a PNG of the objective against depth to this file")
    algo.add_argument("--search-dtype", metavar="DTYPE", default=None,
                      help="dtype of the copy the search scores plans with (e.g. bf16: ~2-3x faster on CPUs "
                           "with AMX, rankings within ~0.1%%); held-out numbers still use --dtype. "
                           "Default: the model's dtype, no copy")
    out.add_argument("--threads", metavar="N", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")


def check_args(args: argparse.Namespace) -> tuple[list[int] | None, list[int] | None]:
    """Validate everything that does not need the model, before loading it."""
    if (args.target_depth is None) == (args.reduce is None):
        raise ValueError("give exactly one of --target-depth D (e.g. --target-depth 26) or --reduce K.")
    depths = parse_int_list(args.target_depth, "--target-depth") if args.target_depth is not None else None
    reduce = parse_int_list(args.reduce, "--reduce") if args.reduce is not None else None
    for name in ("beam", "shortlist", "calib_windows", "report_tokens", "finalists"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    for name in ("refine_rounds", "select_windows"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(args, name)}).")
    if args.calib_length < 2:
        raise ValueError(f"--calib-length must be at least 2 tokens (got {args.calib_length}).")
    if args.screen is not None and args.screen < 1:
        raise ValueError(f"--screen must be at least 1 (got {args.screen}); omit it to measure every candidate.")
    if args.budget is not None and args.budget < 1:
        raise ValueError(f"--budget must be at least 1 (got {args.budget}); omit it for no cap.")
    if args.report != "none" and args.report_tokens < args.report_window:
        raise ValueError(f"--report-tokens ({args.report_tokens}) must be at least one --report-window "
                         f"({args.report_window}).")
    if args.search_dtype is not None:
        from .models import as_dtype

        as_dtype(args.search_dtype)  # raises naming the accepted dtypes
    if args.report != "none" and args.report == args.calib:
        raise ValueError(f"--report and --calib are the same text ({args.calib!r}); report on text the search "
                         "did not see, e.g. --report default (the held-out novel).")
    return depths, reduce


def run(args: argparse.Namespace) -> int:
    depths, reduce = check_args(args)
    import torch

    from .data import load_text
    from .models import load_from_args
    from .transform import decoder_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    calib_text = load_text(args.calib)
    report_text = load_text(args.report) if args.report != "none" else None
    model, tokenizer = load_from_args(args)
    L = len(decoder_layers(model))
    reductions = target_reductions(L, depths, reduce, args.max_group, args.allow_skip)
    ids, select_ids = split_calibration_ids(tokenizer, calib_text, args.calib_windows, args.select_windows,
                                            args.calib_length)
    opt = Options(args.max_group, args.allow_skip, args.beam, args.shortlist, args.refine_rounds, args.screen,
                  args.budget, progress)
    t0 = time.perf_counter()
    scoring_model = search_copy(model, args.search_dtype)
    scorer = PlanScorer(scoring_model, ids, args.objective)
    print(f"{args.model}: {L} layers; calibration {tuple(ids.shape)} tokens of {args.calib!r} "
          f"(+ {args.select_windows} fresh windows for the final choice); "
          f"objective {args.objective}, original model {scorer.base:.4f}")
    result = search(scorer, reductions, opt)
    summary = {"model": args.model, "command": "truedepth search " + " ".join(_argv_of(args)),
               "calibration": {"text": args.calib, "windows": args.calib_windows, "length": args.calib_length,
                               "select_windows": args.select_windows, "finalists": args.finalists,
                               "dtype": str(next(scorer.model.parameters()).dtype)},
               "options": vars(opt) | {"objective": args.objective}, **result.to_dict()}
    summary["search_seconds"] = round(time.perf_counter() - t0, 2)
    save = _saver(args.out)
    save(summary)  # each stage is saved as it ends: a long run that stops later keeps its plans
    if args.baseline:  # before the final choice, so the contiguous ranges are among its finalists
        base = contiguous_baseline(scorer, reductions, progress)
        summary["baseline"] = [base[k] for k in sorted(base)]
        save(summary)
    if select_ids is not None:
        t1 = time.perf_counter()
        selector = PlanScorer(scoring_model, select_ids, args.objective)
        select_on_fresh_windows(scorer, selector, result.found, args.finalists, progress)
        summary["found"] = result.to_dict()["found"]
        for row in summary.get("baseline", []):
            row["selection_objective"] = selector.score(Plan.from_dict(row["plan"]))
        summary["selection_base_objective"] = selector.base
        summary["selection_seconds"] = round(time.perf_counter() - t1, 2)
        save(summary)
    if report_text is not None:
        summary["report"] = {"text": args.report, "tokens": args.report_tokens, "window": args.report_window}
        rows = summary["found"] + summary.get("baseline", [])
        report_held_out(model, tokenizer, rows, report_text, args.report_tokens, args.report_window, progress)
        summary["base_heldout_ppl"] = held_out_perplexity(model, tokenizer, Plan(()), report_text,
                                                          args.report_tokens, args.report_window)
    print_summary(summary)
    save(summary)
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        plot(summary, args.plot)
        print(f"wrote {args.plot}")
    return 0


def search_copy(model: Any, dtype: Any) -> Any:
    """The model the search scores plans with: `model` itself, or a copy cast to `dtype`."""
    from .models import as_dtype

    dtype = as_dtype(dtype)
    if dtype is None or dtype == next(model.parameters()).dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _saver(path: str | None) -> Callable[[dict], None]:
    def save(summary: dict) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            tmp.replace(path)
    return save


def _argv_of(args: argparse.Namespace) -> list[str]:
    import sys

    return sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "search" else []


def print_summary(summary: dict) -> None:
    base = {b["depth"]: b for b in summary.get("baseline", [])}
    obj = summary["objective"]

    def num(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if row.get(key) is not None else "-"

    print(f"\n{'depth':>5}  {obj:>9}  {'fresh':>9}  {'held-out':>8}  {'passes':>6}  plan")
    for f in summary["found"]:
        print(f"{f['depth']:>5}  {f['objective']:>9.4f}  {num(f, 'selection_objective', '9.4f'):>9}  "
              f"{num(f, 'heldout_ppl', '.3f'):>8}  {f['forward_passes']:>6}  {f['plan']['plan']}")
        b = base.get(f["depth"])
        if b:
            print(f"{'':>5}  {b['objective']:>9.4f}  {num(b, 'selection_objective', '9.4f'):>9}  "
                  f"{num(b, 'heldout_ppl', '.3f'):>8}  {b['forward_passes']:>6}  {b['plan']['plan']}"
                  "  (best contiguous range)")
    if "base_heldout_ppl" in summary:
        print(f"original model: {obj} {summary['base_objective']:.4f}, held-out ppl {summary['base_heldout_ppl']:.3f}")
    print(f"search: {summary['forward_passes']} forward passes over the calibration batch "
          f"({summary['layer_runs'] / summary['num_layers']:.1f} full-model equivalents of decoder layers), "
          f"{summary['search_seconds']:.1f} s" + (f"; final choice on fresh windows {summary['selection_seconds']:.1f} s"
                                                 if "selection_seconds" in summary else ""))
    if len(summary["found"]) == 1:
        print("plan:", summary["found"][0]["plan"]["plan"])
        print("json:", json.dumps(summary["found"][0]["plan"]))
