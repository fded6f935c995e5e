"""Block matching (`finetune --loss blocks`, `--block-weight`): the loss against hidden states of
independently built models, the local variant's stopped forward and detached inputs, training and CLI."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model

from truedepth.apps.finetune import model as ft_model
from truedepth.apps.finetune.blockloss import BlockMatch
from truedepth.core.transform import apply_plan

PLAN = "parallel=2:6"  # 8 layers -> keep 0, keep 1, wide(2,3), wide(4,5), keep 6, keep 7


def student_and_base(arch="llama", plan=PLAN):
    base = tiny_model(arch, layers=8, seed=3)
    student = ft_model.build_student(base, plan)
    ft_model.freeze_all_but(student, ft_model.wide_layer_indices(student))
    return student, base


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states


def relative_error(out, target, inp):
    return float(((out - target) ** 2).mean() / ((target - inp) ** 2).mean())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_block_loss_equals_the_error_measured_on_hidden_states_of_separate_models(arch):
    """Wide layer 2 replaced (2, 3), wide layer 3 replaced (4, 5). Their targets come from models that run
    those layers one after another: the base for the first, a model with only the first group fused for
    the second (its layer 3 is the same wide layer, so layers 4 and 5 see the student's input)."""
    student, base = student_and_base(arch)
    first_only = apply_plan(tiny_model(arch, layers=8, seed=3), "parallel=2:4")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    s, b, f = hidden_states(student, ids), hidden_states(base, ids), hidden_states(first_only, ids)
    torch.testing.assert_close(f[3], s[3], rtol=0, atol=1e-6)  # the same first wide layer
    want = (relative_error(s[3], b[4], b[2]) + relative_error(s[4], f[5], s[3])) / 2

    blocks = BlockMatch(student.model.layers, base.model.layers, ft_model.wide_members(PLAN, 8))
    assert blocks.members == {2: (2, 3), 3: (4, 5)}
    with torch.no_grad():
        blocks.run_student(student, ids)
        got = float(blocks.loss())
    blocks.close()
    assert got == pytest.approx(want, rel=1e-5)
    assert got > 0.01  # the plan changed something: the check above is not 0 == 0


def test_local_block_loss_stops_after_the_last_wide_layer_and_trains_each_layer_on_its_own_error():
    student, base = student_and_base()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    head_calls = []
    student.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    members = ft_model.wide_members(PLAN, 8)

    def gradients(local, only=None):
        student.zero_grad(set_to_none=True)
        blocks = BlockMatch(
            student.model.layers, base.model.layers, {i: members[i] for i in (only or members)}, local=local
        )
        out = blocks.run_student(student, ids)
        loss = blocks.loss()
        loss.backward()
        blocks.close()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        return out, float(loss.detach()), grads

    out, local_loss, local_grads = gradients(local=True)
    assert out is None and head_calls == []  # stopped after wide layer 3: no later layer, no head
    full_out, full_loss, full_grads = gradients(local=False)
    assert full_out is not None and head_calls == [1]
    assert local_loss == pytest.approx(full_loss, rel=1e-6)  # same numbers, only the graph differs
    assert {n.split(".")[2] for n in local_grads} == {"2", "3"}  # only the wide layers get gradients
    # local: layer 2's gradient comes from its own error only (half of the mean over two layers);
    # otherwise layer 3's error reaches layer 2 through layer 3's input
    _, _, own_grads = gradients(local=True, only=[2])
    name = "model.layers.2.mlp.down_proj.weight"
    torch.testing.assert_close(local_grads[name], own_grads[name] / 2, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(full_grads[name], own_grads[name] / 2, rtol=1e-3, atol=1e-7)


def test_block_loss_needs_a_student_forward_first():
    student, base = student_and_base()
    blocks = BlockMatch(student.model.layers, base.model.layers, ft_model.wide_members(PLAN, 8))
    with pytest.raises(RuntimeError, match="run the student forward first"):
        blocks.loss()
    blocks.close()


def test_blocks_loss_refuses_neighbours_and_mixed_attention_types():
    from truedepth.apps.finetune.blockloss import check_one_attention_type
    from truedepth.apps.finetune.config import TrainConfig

    with pytest.raises(ValueError, match="never reaches the --neighbours or --train-last layers"):
        TrainConfig(loss="blocks", neighbours=1).validate()
    TrainConfig(loss="distill", neighbours=1, block_weight=1.0).validate()
    check_one_attention_type(tiny_model("qwen3", layers=4).config)
    mixed = tiny_model("qwen3", layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2).config
    assert len(set(mixed.layer_types)) == 2
    with pytest.raises(ValueError, match="mixes full_attention, sliding_attention"):
        check_one_attention_type(mixed)
