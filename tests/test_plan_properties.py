"""Property-based tests (hypothesis) of the plan parser and apply_plan.

For any text, any JSON value and any list of steps, the only error a user can get is PlanError (a
ValueError naming the problem); a plan that parses prints and reparses to itself; and a plan that
applies gives exactly the slow reference's logits, on tiny models of every architecture. A refused
plan leaves the model unchanged. Bounded: a few seconds per property.
"""

import copy
import json
import os

import pytest
import torch
from helpers.reference import reference_logits
from helpers.tiny import ARCHS, tiny_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import truedepth
from truedepth import Plan, PlanError, as_plan
from truedepth.core.plan import STEP_KINDS

LAYERS = 6
SCALE = int(os.environ.get("TRUEDEPTH_HYPOTHESIS_SCALE", "1"))  # e.g. 20 for a long local hunt
FAST = settings(max_examples=300 * SCALE, deadline=None)
MODELS = settings(max_examples=40 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_or_plan_error(text):
    """Plan.parse(text), or None when it raises PlanError; any other exception fails the test."""
    try:
        return Plan.parse(text)
    except PlanError as e:
        assert str(e).strip() and "Traceback" not in str(e)
        return None


def assert_round_trips(plan):
    assert Plan.parse(str(plan)) == plan
    assert Plan.parse(plan.to_json()) == plan
    assert as_plan(json.loads(plan.to_json())) == plan
    assert as_plan(plan.to_dict()["steps"]) == plan


# ---- text -------------------------------------------------------------------------------------
numbers = st.one_of(st.integers(0, 12).map(str), st.sampled_from(["-1", "00", "1e3", "٣", "²", "9" * 30, "", " "]))
words = st.sampled_from([*STEP_KINDS, "PARALLEL", "par", "base", "none", "", " "])
step_texts = st.builds(
    lambda kind, eq, a, colon, b, slash, g, at, s: f"{kind}{eq}{a}{colon}{b}{slash}{g}{at}{s}",
    words,
    st.sampled_from(["=", "", "==", ":"]),
    numbers,
    st.sampled_from([":", "", "-", "::"]),
    numbers,
    st.sampled_from(["/", "", "//"]),
    numbers,
    st.sampled_from(["@", ""]),
    numbers,
)
plan_texts = st.lists(step_texts, max_size=4).map(",".join)


@FAST
@given(st.one_of(st.text(max_size=40), plan_texts))
@example("parallel=2:4\n")
@example("{")
@example("[1, 2]")
@example("parallel=" + "9" * 5000)
def test_any_text_parses_or_raises_plan_error(text):
    plan = parse_or_plan_error(text)
    if plan is not None:
        assert_round_trips(plan)


# ---- JSON -------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from(STEP_KINDS),
)
any_json = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
field_values = st.one_of(
    st.integers(-2, 12),
    st.integers(-2, 12).map(float),
    scalars,
    st.lists(st.integers(-1, 12), max_size=4),
    st.just(2.5),
    st.just(10**30),
)
step_dicts = st.dictionaries(
    st.sampled_from(["kind", "start", "end", "group", "seed", "layers", "other"]), field_values, max_size=5
)
near_plans = st.one_of(
    st.lists(step_dicts, max_size=3),
    st.lists(step_dicts, max_size=3).map(lambda s: {"steps": s}),
    st.fixed_dictionaries({"steps": any_json}),
    st.fixed_dictionaries({"plan": scalars}),
)


@FAST
@given(st.one_of(any_json, near_plans))
@example({"kind": "parallel", "start": 2, "end": 4})  # one step, not a plan
@example([{"kind": "skip", "start": float("inf")}])
@example([{"kind": "skip", "start": 1.5}])
@example([{"kind": "keep", "start": True}])
@example({"steps": [{"kind": "parallel", "layers": "23"}]})
@example("[" * 5000)
def test_any_json_parses_or_raises_plan_error(value):
    for call in (lambda: as_plan(value), lambda: Plan.parse(value if isinstance(value, str) else json.dumps(value))):
        try:
            plan = call()
        except PlanError as e:
            assert str(e).strip()
            continue
        assert_round_trips(plan)


def test_a_plan_dict_without_steps_is_not_the_identity():
    """A single step given where a plan is expected was silently read as 'base'."""
    with pytest.raises(PlanError, match="steps"):
        as_plan({"kind": "parallel", "start": 2, "end": 4})


@pytest.mark.parametrize(
    "value, words",
    [
        ([{"kind": "skip", "start": 1.5}], ["start", "1.5", "integer"]),
        ([{"kind": "skip", "start": True}], ["start", "integer"]),
        ([{"kind": "skip"}], ["start"]),
        ([{"kind": "parallel", "start": "two", "end": 4}], ["start", "'two'"]),
        ([5], ["step", "5"]),
        ({"steps": 3}, ["steps", "list"]),
        ('{"steps": [', ["JSON"]),
    ],
)
def test_malformed_json_plans_name_the_field(value, words):
    with pytest.raises(PlanError) as err:
        Plan.parse(value) if isinstance(value, str) else as_plan(value)
    for w in words:
        assert w in str(err.value)


# ---- plans applied to tiny models -------------------------------------------------------------
_models = {}


def original(arch):
    if arch not in _models:  # built once per architecture
        _models[arch] = (tiny_model(arch, layers=LAYERS), torch.randint(3, 128, (2, 6)))
    return _models[arch]


def assert_same_model(model, base):
    assert str(model) == str(base) and model.config.to_dict() == base.config.to_dict()
    assert model.state_dict().keys() == base.state_dict().keys()
    for (k, want), got in zip(base.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), k


steps = st.builds(
    lambda kind, start, length, group, seed: {
        "kind": kind,
        "start": start,
        "end": start + length,
        **({"group": group} if group else {}),
        **({"seed": seed} if kind == "shuffle" else {}),
    },
    st.sampled_from(STEP_KINDS),
    st.integers(0, LAYERS),
    st.integers(0, 4),
    st.sampled_from([None, 0, 1, 2, 3]),
    st.integers(0, 9),
)


@st.composite
def fitting_plans(draw):
    """Steps that tile the layers without overlap (most random step lists are refused)."""
    out, i = [], draw(st.integers(0, 2))
    while i < LAYERS:
        kind = draw(st.sampled_from([*STEP_KINDS, "unmentioned"]))
        group = draw(st.integers(2, 3))
        length = group * draw(st.integers(1, 2)) if kind in ("parallel", "merge") else draw(st.integers(1, 3))
        if i + length > LAYERS:
            break
        if kind != "unmentioned":
            out.append(
                {
                    "kind": kind,
                    "start": i,
                    "end": i + length,
                    **({"group": group} if kind in ("parallel", "merge") else {}),
                    **({"seed": draw(st.integers(0, 99))} if kind == "shuffle" else {}),
                }
            )
        i += length
    return out


plans = st.one_of(st.lists(steps, max_size=3), fitting_plans())


@pytest.mark.parametrize("arch", ARCHS)
@MODELS
@given(steps=plans)
def test_any_plan_applies_exactly_or_raises_plan_error_leaving_the_model_unchanged(arch, steps):
    base, ids = original(arch)
    model = copy.deepcopy(base)
    try:
        plan = as_plan(steps)
        applied = truedepth.apply_plan(model, plan)
    except PlanError:
        assert_same_model(model, base)
        return
    assert applied is model
    want = reference_logits(base, plan, ids)
    with torch.no_grad():
        got = model(ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5, str(plan)
    assert model.config.num_hidden_layers == len(model.model.layers) == plan.depth(LAYERS)
    assert_round_trips(plan)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@MODELS
@given(text=st.one_of(plan_texts, st.text(max_size=20)))
def test_any_plan_text_applies_or_raises_plan_error(arch, text):
    base, ids = original(arch)
    model = copy.deepcopy(base)
    try:
        truedepth.apply_plan(model, text)
    except PlanError:
        assert_same_model(model, base)
        return
    want = reference_logits(base, text, ids)
    with torch.no_grad():
        assert ((model(ids).logits - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.parametrize(
    "plan, words", [("keep=3:7", ["out of range", "6 layers"]), ("keep=0,keep=0", ["both use layer 0"])]
)
def test_a_plan_of_keep_steps_is_checked_too(plan, words):
    """A plan of only `keep` steps changes nothing, but was accepted even when it did not fit."""
    model = copy.deepcopy(original("llama")[0])
    with pytest.raises(PlanError) as err:
        truedepth.apply_plan(model, plan)
    for w in words:
        assert w in str(err.value)
