"""Scoring plans for `truedepth search`: the calibration windows, and PlanScorer, which scores a plan from the
original model's recorded layer inputs without building it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ...core.arch import UnsupportedModelError, layer_hidden
from ...core.plan import Block, Plan, PlanError
from ...utils.errors import UserError
from .space import Element, plan_of

OBJECTIVES = ("ppl", "kl")


# ---------------------------------------------------------------------------------------------
# Calibration batch
# ---------------------------------------------------------------------------------------------
def calibration_ids(tokenizer: Any, text: str, windows: int = 16, length: int = 512) -> Any:
    """`windows` windows of `length` tokens spread evenly over `text` (deterministic), as a
    (windows, length) LongTensor. Spreading them samples many chapters with few tokens."""
    import torch

    if windows < 1 or length < 2:
        raise UserError(
            f"need at least 1 calibration window of at least 2 tokens (got {windows} x {length}); "
            "pass e.g. --calib-windows 8 --calib-length 256."
        )
    chars = length * 8  # Austen-like English averages ~4-5 characters per token: 8 leaves spare
    if len(text) < chars:
        raise UserError(
            f"the calibration text has {len(text)} characters, too short for windows of {length} "
            "tokens; pass a longer --calib text or a smaller --calib-length."
        )
    rows = []
    for k in range(windows):
        start = (len(text) - chars) * k // max(windows - 1, 1)
        start = _word_start(text, start)
        ids = tokenizer(text[start : start + chars], add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            raise UserError(
                f"calibration window {k} holds only {len(ids)} tokens, fewer than {length}; "
                "pass a smaller --calib-length or a longer --calib text."
            )
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

    `keep_states(plan)` also keeps the input of every block of one plan (a beam parent, the plan
    being refined): a plan that agrees with it up to some layer then starts there, so extending
    `parallel=3:5` by `parallel=24:26` re-runs 6 layers instead of 27, with the same result.
    """

    def __init__(self, model: Any, input_ids: Any, objective: str = "ppl") -> None:
        import torch

        from ...core.arch import check_supported, current_plan, decoder_layers

        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}.")
        previous = current_plan(model.config)
        if previous is not None and not previous.is_identity:
            raise PlanError(
                f"the model was already transformed with plan '{previous}'; the search needs the "
                "original model (plans refer to its layers): load it without a plan."
            )
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
        self._kept: tuple[list[Block], dict[int, Any]] | None = None  # one plan's blocks, the input of each by position
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
            raise UnsupportedModelError(
                "could not record the layer inputs of the model: its decoder layers or final norm "
                "were not called as expected (is this a standard HF decoder-only model?)."
            )
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
        it changes (or from where it leaves the kept plan); counted as one forward pass."""
        import torch

        blocks = plan.blocks(self.num_layers)
        start, x = self._start(blocks)
        with torch.no_grad():
            for block in blocks[start:]:
                x = self._run_block(block, x)
                self.layer_runs += len(block.layers)
        self.evals += 1
        return x

    def _start(self, blocks: list[Block]) -> tuple[int, Any]:
        """The first block of `blocks` to run and its input: after the longest run of leading blocks
        that the original model, or the kept plan, shares with it."""
        first = first_changed_block(blocks)
        start, x = first, self.inputs[first]  # before `first`, every block is an original layer
        if self._kept is not None:
            kept_blocks, kept_inputs = self._kept
            common = 0
            while common < min(len(blocks), len(kept_blocks)) and blocks[common] == kept_blocks[common]:
                common += 1
            if common > first:  # both ran the same blocks so far: the same state
                start, x = common, kept_inputs[common]
        return start, x

    def keep_states(self, plan: Any) -> None:
        """Keep the input of every block of `plan` (one pass over the layers it changes; not counted
        as a plan evaluation in `evals`) so plans sharing its first blocks start where they part.
        Replaces the plan kept before; costs one hidden state per changed layer in memory."""
        import torch

        blocks = self._as_plan(plan).blocks(self.num_layers)
        if self._kept is not None and self._kept[0] == blocks:
            return
        self._kept = None  # its memory is free before the new states are made
        first = first_changed_block(blocks)
        inputs: dict[int, Any] = {}
        x = self.inputs[first]
        with torch.no_grad():
            for k in range(first, len(blocks)):
                inputs[k] = x
                x = self._run_block(blocks[k], x)
                self.layer_runs += len(blocks[k].layers)
        inputs[len(blocks)] = x
        self._kept = (blocks, inputs)

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
            return layer_hidden(self.layers[block.layers[0]](x, **kw))
        if block.kind != "parallel":
            raise PlanError(f"the search scorer handles parallel groups and skips, not '{block.kind}'.")
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
