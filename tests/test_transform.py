import pytest
import torch
from helpers.reference import reference_logits
from helpers.tiny import ARCHS, tiny_model

import truedepth
from truedepth import PlanError


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def full_snapshot(model):
    """Everything a failed transform must leave unchanged: module tree, every tensor (value, dtype,
    device), the config (layer_types and num_hidden_layers included) and the model's class."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "tree": str(model),
        "class": type(model),
        "config": model.config.to_dict(),
        "state": state,
        "params": [id(p) for p in model.parameters()],
        "bytes": storage_bytes(model.parameters()),
    }


def assert_unchanged(model, before):
    after = full_snapshot(model)
    assert after["tree"] == before["tree"] and after["class"] is before["class"]
    assert after["config"] == before["config"]
    assert after["params"] == before["params"]  # the same Parameter objects (optimizers keep working)
    assert after["state"].keys() == before["state"].keys()
    for k, want in before["state"].items():
        got = after["state"][k]
        assert got.device == want.device and got.dtype == want.dtype and torch.equal(got, want), k
    assert all(p.is_contiguous() for p in model.parameters())
    assert storage_bytes(model.parameters()) == before["bytes"]  # no wide tensor kept alive


def storage_bytes(tensors):
    """Bytes of the distinct memory blocks behind `tensors` (views of one block count once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("group", [2, 3])
def test_parallel_wide_layer_matches_slow_reference(arch, group):
    model = tiny_model(arch, layers=9)
    ids = torch.randint(3, 128, (2, 11))
    plan = f"parallel=2:{2 + 2 * group}/{group}" if group != 2 else "parallel=1:7"
    want = reference_logits(model, plan, ids)
    truedepth.apply_plan(model, plan)
    got = model(ids).logits
    assert rel_err(got, want) <= 1e-5
    # the fused model really is shallower and wider
    widths = model.config.truedepth["layer_widths"]
    assert len(model.model.layers) == len(widths) == model.config.num_hidden_layers
    assert max(widths) == group


def test_parallel_is_not_the_sequential_model():
    """Guards the reference itself: LP must differ from the unmodified model."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 9))
    base = model(ids).logits
    assert rel_err(reference_logits(model, "parallel=2:6", ids), base) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "plan",
    [
        "skip=3",
        "skip=2:4,parallel=5:7",
        "shuffle=1:7@5",
        "merge=2:6/2",
        "merge=1:4/3,parallel=5:7",
        "parallel=0:2,parallel=4:7/3",
    ],
)
def test_every_step_kind_matches_reference(arch, plan):
    model = tiny_model(arch, layers=8)
    ids = torch.randint(3, 128, (2, 10))
    want = reference_logits(model, plan, ids)
    truedepth.apply_plan(model, plan)
    assert rel_err(model(ids).logits, want) <= 1e-5
    assert model.config.num_hidden_layers == truedepth.Plan.parse(plan).depth(8)


def test_parallelize_shortcut_and_config_record():
    model = tiny_model("llama", layers=8)
    truedepth.parallelize(model, 2, 8, group_size=3)
    info = model.config.truedepth
    assert info["original_num_hidden_layers"] == 8
    assert truedepth.Plan.from_dict(info["plan"]) == truedepth.Plan.parse("parallel=2:8/3")
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(4))


@pytest.mark.parametrize(
    "plan, words",
    [
        ("parallel=6:10", ["out of range", "8 layers"]),
        ("parallel=2:6,skip=5", ["both use layer 5"]),
        ("parallel=2:6/1", ["at least 2"]),
        ("parallel=2:5", ["do not split", "2:6"]),
        ('{"steps": [{"kind": "parallel", "layers": [2, 4]}]}', ["consecutive"]),
        ("skip=0:8", ["removes every layer"]),
        ("frobnicate=1:3", ["unknown step kind", "parallel=A:B"]),
        ("parallel=3", ["needs a range"]),
    ],
)
def test_bad_plan_raises_and_leaves_model_unchanged(plan, words):
    model = tiny_model("llama", layers=8)
    before = full_snapshot(model)
    with pytest.raises(PlanError) as err:
        truedepth.apply_plan(model, plan)
    for w in words:
        assert w in str(err.value)
    assert_unchanged(model, before)


def test_different_eps_refused_atomically():
    model = tiny_model("llama", layers=8)
    model.model.layers[3].input_layernorm.variance_epsilon = 1e-3
    before = full_snapshot(model)
    with pytest.raises(PlanError, match="eps"):
        truedepth.apply_plan(model, "parallel=2:4")
    assert_unchanged(model, before)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    before = full_snapshot(model)
    with pytest.raises(PlanError) as err:
        truedepth.apply_plan(model, "parallel=0:2")
    assert "gpt2" in str(err.value) and "llama" in str(err.value) and "qwen3" in str(err.value)
    assert_unchanged(model, before)


def test_second_plan_refused():
    model = tiny_model("llama", layers=8)
    truedepth.apply_plan(model, "parallel=2:4")
    before = full_snapshot(model)
    with pytest.raises(PlanError, match="already transformed"):
        truedepth.apply_plan(model, "parallel=4:6")
    assert_unchanged(model, before)


def test_identity_plan_changes_nothing():
    model = tiny_model("mistral", layers=4)
    ids = torch.randint(3, 128, (1, 7))
    want = model(ids).logits
    truedepth.apply_plan(model, "base")
    assert torch.equal(model(ids).logits, want)


def test_transform_releases_old_group_weights():
    """Group by group: the fused model holds exactly the original parameter count, no leftovers."""
    model = tiny_model("qwen2", layers=8)
    n = sum(p.numel() for p in model.parameters())
    truedepth.apply_plan(model, "parallel=0:8")
    # every projection weight is kept once; only the 4 groups' second copies of 2 norms go
    assert sum(p.numel() for p in model.parameters()) == n - 4 * 2 * model.config.hidden_size
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_attention_backend_change_after_transform_reaches_wide_layers():
    model = tiny_model("llama", layers=6)
    ids = torch.randint(3, 128, (2, 9))
    want = reference_logits(model, "parallel=2:6", ids)
    truedepth.apply_plan(model, "parallel=2:6")
    model.set_attn_implementation("sdpa")
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in model.model.layers)
    assert rel_err(model(ids).logits, want) <= 1e-5


# ---- a failure in the middle of a transform leaves the model exactly as it was -----------------
class InjectedFailure(Exception):
    pass


# every kind of group, several groups per plan; each group is failed in turn
FAILING_PLANS = ["parallel=0:4,merge=4:6,parallel=6:9/3", "merge=0:4/2,shuffle=4:7@3,parallel=7:9"]


def groups_of(plan):
    return [b for b in truedepth.Plan.parse(plan).blocks(9) if b.kind != "keep"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plan", FAILING_PLANS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_failure_while_building_any_group_leaves_the_model_unchanged(arch, plan, when, monkeypatch):
    """`when`: the k-th group fails before its layer is built, or once it is completely staged."""
    import truedepth.core.transform as T

    model = tiny_model(arch, layers=9)
    ids = torch.randint(3, 128, (2, 7))
    want_logits = model(ids).logits
    real_build = T._build
    for k in range(len(groups_of(plan))):
        before = full_snapshot(model)
        calls = []

        def failing_build(model, block, *args, calls=calls, k=k, **kw):
            if block.kind != "keep":
                calls.append(block)
                if len(calls) == k + 1 and when == "before":
                    raise InjectedFailure(f"group {k}")
            layer = real_build(model, block, *args, **kw)
            if len(calls) == k + 1 and block.kind != "keep" and when == "after":
                raise InjectedFailure(f"group {k}")
            return layer

        monkeypatch.setattr(T, "_build", failing_build)
        with pytest.raises(InjectedFailure):
            truedepth.apply_plan(model, plan)
        assert len(calls) == k + 1
        assert_unchanged(model, before)
        assert torch.equal(model(ids).logits, want_logits)
    # and the same model still transforms correctly afterwards
    monkeypatch.setattr(T, "_build", real_build)
    want = reference_logits(model, plan, ids)
    truedepth.apply_plan(model, plan)
    assert rel_err(model(ids).logits, want) <= 1e-5


def test_interrupt_during_the_transform_leaves_the_model_unchanged(monkeypatch):
    """Ctrl-C is not an Exception, and must roll back too."""
    import truedepth.core.transform as T

    model = tiny_model("qwen3", layers=9)
    before = full_snapshot(model)
    real_fused = T.fused_state
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fused(*a, **kw)

    monkeypatch.setattr(T, "fused_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        truedepth.apply_plan(model, "parallel=0:6")
    assert_unchanged(model, before)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_staged_layers_share_memory_with_the_model(arch, monkeypatch):
    """The memory promise while staging: old and staged layers together never hold more than the
    model plus the small new norm/bias tensors (no second copy of any projection)."""
    import truedepth.core.transform as T

    model = tiny_model(arch, layers=9)
    original = storage_bytes(model.parameters())
    hidden = model.config.hidden_size
    staged, peaks = [], []
    real_build = T._build

    def recording_build(*a, **kw):
        staged.append(real_build(*a, **kw))
        held = [p for m in [model, *staged] for p in m.parameters()]
        peaks.append(storage_bytes(held) - original)
        return staged[-1]

    monkeypatch.setattr(T, "_build", recording_build)
    truedepth.apply_plan(model, "parallel=0:6/3,merge=6:8")
    # per group at most: two ones-norms of `hidden`, and the Qwen3 per-head norms
    small = 4 * (
        2 * hidden
        + 2 * 3 * (model.config.num_attention_heads + model.config.num_key_value_heads) * model.config.head_dim
    )
    assert peaks and max(peaks) <= 3 * small, peaks


def test_failure_on_a_model_with_fused_projections_restores_the_views(monkeypatch):
    """fuse_projections makes q/k/v views of one tensor; a rollback must give those views back."""
    import truedepth.core.transform as T
    from truedepth.runtime.generate import fuse_projections

    model = fuse_projections(tiny_model("llama", layers=6))
    attn = model.model.layers[2].self_attn
    before = full_snapshot(model)
    real_fused = T.fused_state

    def failing(members, *a, **kw):
        state = real_fused(members, *a, **kw)
        if members[0] is model.model.layers[2]:  # the second group, once staged
            raise InjectedFailure
        return state

    monkeypatch.setattr(T, "fused_state", failing)
    with pytest.raises(InjectedFailure):
        truedepth.apply_plan(model, "parallel=0:6")
    assert_unchanged(model, before)
    assert attn.q_proj.weight.data_ptr() == attn._td_qkv_weight.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == attn._td_qkv_weight.untyped_storage().data_ptr()


def test_a_model_class_without_a_truedepth_class_is_refused_before_any_change():
    """A supported architecture in another head class (here: sequence classification) used to be
    transformed and then fail in `adopt`, half converted."""
    from helpers.tiny import tiny_config
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(tiny_config("llama", 4), dtype=torch.float32).eval()
    before = full_snapshot(model)
    with pytest.raises(PlanError, match="LlamaForSequenceClassification.*AutoModelForCausalLM"):
        truedepth.apply_plan(model, "parallel=0:2")
    assert_unchanged(model, before)
