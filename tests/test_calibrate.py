"""`truedepth finetune --calibrate`: per-member vectors of the wide layers that fold exactly into their weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_user_error
from helpers.tiny import ARCHS, char_tokenizer, tiny_model

import truedepth
from truedepth import cli
from truedepth.apps.finetune import calibrate as cal
from truedepth.apps.finetune import config as ft_config
from truedepth.apps.finetune import model as ft_model
from truedepth.apps.finetune import train as ft_train

PLAN = "parallel=2:6"  # 8 layers -> keep 0, keep 1, wide(2,3), wide(4,5), keep 6, keep 7: 2 wide layers of width 2
pytestmark = pytest.mark.usefixtures("private_cache")  # tiny_dir: tests/conftest.py


def lp_student(arch="llama", seed=0):
    """The LP model of PLAN, its wide layers trainable (as the fine-tune leaves them), and the base model."""
    base = tiny_model(arch, layers=8, seed=seed)
    student = ft_model.build_student(base, PLAN)
    ft_model.freeze_all_but(student, ft_model.wide_layer_indices(student))
    return student, base


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def others(model):
    """Every parameter and buffer that is not a calibration vector (the weights under a parametrization
    included), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not cal.is_calibration(k)}


def vectors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if cal.is_calibration(n)}


def config(**kw):
    kw = dict(dict(loss="distill", seq_len=16, batch_size=4, tokens=16 * 4 * 8, calibrate="both", lr=3e-3), **kw)
    return ft_config.TrainConfig(**kw)


def random_ids(n=3000, seed=0):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def teacher_of(student, base):
    return ft_model.Teacher(base, student.model.layers, 2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["scales", "norms", "both"])
def test_vectors_start_at_identity_and_count_four_hidden_vectors_per_wide_layer_and_member(arch, kind):
    """Ones leave the logits bit-identical. Trainable: per wide layer and member, one hidden-size vector for each
    of attention output and MLP output (scales) and/or input norm and post-attention norm (norms): with
    2 wide layers of 2 members, 2 x 2 x 2 x hidden per kind, 4 x 2 x 2 x hidden for both (1024 here)."""
    student, _ = lp_student(arch)
    ids = torch.randint(3, 128, (2, 12))
    before = logits(student, ids)
    names = cal.calibrate_model(student, kind, weights_train=False)
    hidden = student.config.hidden_size
    assert torch.equal(logits(student, ids), before)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert set(trainable) == set(names)
    assert sum(p.numel() for p in trainable.values()) == (4 if kind == "both" else 2) * 2 * 2 * hidden
    assert all(p.shape == (2, hidden) and p.dtype == torch.float32 for p in trainable.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_vectors_fold_into_the_weights_and_survive_save_and_load(arch, tmp_path):
    """After optimizer steps that moved the vectors (and nothing else), the logits of the calibrated model equal
    those of the folded one and of the saved and reloaded folder, whose names and shapes are the LP model's."""
    student, base = lp_student(arch)
    lp_state = {k: v.shape for k, v in student.state_dict().items()}
    cal.calibrate_model(student, "both", weights_train=False)
    frozen, start, base_before = others(student), vectors(student), copy.deepcopy(base.state_dict())
    cfg = config(lr=3e-3, calibrate_lr=5e-2, tokens=16 * 4 * 6)
    ft_train.train(
        student, teacher_of(student, base), ft_train.TokenBatches(random_ids(), 16, 4), cfg, None, progress=False
    )
    moved = vectors(student)
    assert all((moved[n] - start[n]).abs().max() > 1e-3 for n in moved)  # every vector changed
    after = others(student)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())

    student.eval()
    ids = torch.randint(3, 128, (2, 16))
    want = logits(student, ids)
    folded = cal.fold(copy.deepcopy(student))
    torch.testing.assert_close(logits(folded, ids), want, rtol=0, atol=1e-5)
    assert {k: v.shape for k, v in folded.state_dict().items()} == lp_state
    truedepth.save(folded, char_tokenizer(), tmp_path / "saved")
    loaded, _ = truedepth.load(tmp_path / "saved")
    assert {k: v.shape for k, v in loaded.state_dict().items()} == lp_state
    assert loaded.config.truedepth == student.config.truedepth
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-5)


def test_folded_weights_are_the_lp_weights_times_one_vector_per_member():
    """Independently of the parametrization: o_proj/down_proj change by one factor per row of each member's
    column block, q/k/v (gate/up) by one factor per column of each member's row block, the same for q, k and v."""
    student, _ = lp_student()
    lp = {k: v.clone() for k, v in student.state_dict().items()}
    cal.calibrate_model(student, "both", weights_train=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if cal.is_calibration(n):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    folded = cal.fold(student).state_dict()
    for i in (2, 3):
        for parent, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            key = f"model.layers.{i}.{parent}.{name}.weight"
            ratio = (folded[key] / lp[key]).view(lp[key].shape[0], 2, -1)  # [out, member, member's columns]
            torch.testing.assert_close(ratio, ratio[:, :, :1].expand_as(ratio), rtol=1e-6, atol=0)
            assert not torch.allclose(ratio, torch.ones_like(ratio))
        for parent, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            gains = []
            for name in names:
                key = f"model.layers.{i}.{parent}.{name}.weight"
                ratio = (folded[key] / lp[key]).view(2, -1, lp[key].shape[1])  # [member, member's rows, in]
                torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-6, atol=0)
                gains.append(ratio[:, 0])
            for other in gains[1:]:
                torch.testing.assert_close(other, gains[0], rtol=1e-6, atol=0)
    changed = {k for k in lp if not torch.equal(folded[k], lp[k])}
    assert changed == {
        f"model.layers.{i}.{p}.weight"
        for i in (2, 3)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }


def test_a_first_calibration_stage_then_the_weights_and_resume_across_the_boundary(tmp_path):
    """--calibrate-share 0.5 of 8 steps: steps 1-4 move only the vectors, steps 5-8 only the weights; a run
    stopped after step 3 and resumed in a new model ends bit-identical to the uninterrupted one."""
    cfg = config(calibrate_share=0.5, checkpoint_every=100)
    assert cfg.calibrate_steps == 4 and cfg.weights_train
    data = ft_train.TokenBatches(random_ids(), cfg.seq_len, cfg.batch_size)

    def fresh():
        student, base = lp_student()
        cal.calibrate_model(student, cfg.calibrate, cfg.weights_train)
        return student, teacher_of(student, base)

    student, teacher = fresh()
    frozen, start = others(student), vectors(student)
    ft_train.train(student, teacher, data, cfg, tmp_path / "stage1", stop_after=4, progress=False)
    stage1 = vectors(student)
    assert all(torch.equal(v, frozen[k]) for k, v in others(student).items())  # the weights waited
    assert all(not torch.equal(stage1[n], start[n]) for n in start)
    full = ft_train.train(student, teacher, data, cfg, tmp_path / "stage1", resume=True, progress=False)
    assert full.finished and full.step == 8
    assert all(torch.equal(v, stage1[n]) for n, v in vectors(student).items())  # then the vectors stayed
    wide = [k for k in frozen if k.startswith("model.layers.2.") and k.endswith("original")]
    assert wide and all(not torch.equal(others(student)[k], frozen[k]) for k in wide)
    want = {n: p.detach().clone() for n, p in ft_train.trainable_state(student).items()}

    student, teacher = fresh()
    ft_train.train(student, teacher, data, cfg, tmp_path / "killed", stop_after=3, progress=False)
    student, teacher = fresh()  # a new process
    resumed = ft_train.train(student, teacher, data, cfg, tmp_path / "killed", resume=True, progress=False)
    got = ft_train.trainable_state(student)
    assert resumed.finished and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def finetune_args(tiny_dir, tmp_path, out, *extra):
    g = torch.Generator().manual_seed(0)
    words = ["the", "a", "lady", "said", "Mr.", "Darcy", "was", "not", "very", "happy", "ball", "and", "\n"]
    for name in ("train", "held", "other"):
        idx = torch.randint(len(words), (1500,), generator=g).tolist()
        (tmp_path / f"{name}.txt").write_text(" ".join(words[j] for j in idx))
    return [
        "finetune",
        "--model",
        str(tiny_dir),
        "--plan",
        PLAN,
        "--data",
        str(tmp_path / "train.txt"),
        "--eval-text",
        str(tmp_path / "held.txt"),
        "--other-text",
        str(tmp_path / "other.txt"),
        "--eval-tokens",
        "256",
        "--eval-window",
        "32",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--tokens",
        str(32 * 4 * 6),
        "--checkpoint-every",
        "3",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize("train_dtype", ["fp32", "bf16"])
def test_cli_calibration_saves_an_ordinary_lp_model_with_only_the_wide_projections_changed(
    tiny_dir, tmp_path, train_dtype
):
    out = tmp_path / "cal"
    argv = finetune_args(tiny_dir, tmp_path, out, "--calibrate", "both", "--train-dtype", train_dtype)
    assert cli.main(argv) == 0
    summary = json.loads((out / ft_config.SUMMARY_FILE).read_text())
    assert summary["config"]["calibrate"] == "both" and summary["steps"] == 6
    model, _ = truedepth.load(out)
    lp, _ = truedepth.load(tiny_dir, plan=PLAN)
    state, before = model.state_dict(), lp.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in before.items()}
    assert model.config.to_dict()["truedepth"] == lp.config.to_dict()["truedepth"]
    changed = {k for k in before if not torch.equal(state[k], before[k])}
    assert changed and all(k.split(".")[2] in ("2", "3") and "_proj." in k for k in changed)
    ft = summary["perplexity"]["held_out"]["ft"]
    assert ft != summary["perplexity"]["held_out"]["lp"]


def test_cli_refuses_bad_calibration_options_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    from truedepth.core import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("weights loaded"))
    out = str(tmp_path / "o")
    base = ["finetune", "--model", str(tiny_dir), "--plan", PLAN, "--no-eval", "--out", out]
    for extra, words in [
        (["--calibrate-share", "0.5"], "pass --calibrate as well"),
        (["--calibrate", "scales", "--calibrate-share", "0"], "--calibrate-share is a share"),
        (["--calibrate", "norms", "--lora"], "does not combine with --lora"),
        (["--calibrate", "both", "--neighbours", "1"], "never the --neighbours or --train-last layers"),
        (["--calibrate", "both", "--calibrate-lr", "0"], "--calibrate-lr must be positive"),
    ]:
        assert_user_error(capsys, *base, *extra, words=words)
    assert not Path(out).exists()


def test_compress_takes_the_calibration_options_and_records_them_in_its_finetune_stage():
    from truedepth.apps.compress.options import STAGE_INPUTS, CompressOptions

    opts = CompressOptions(calibrate="scales", calibrate_share=0.25)
    assert (opts.calibrate, opts.calibrate_share, opts.calibrate_lr) == ("scales", 0.25, ft_config.CALIBRATE_LR)
    assert {"calibrate", "calibrate_share", "calibrate_lr"} <= set(STAGE_INPUTS["finetune"])
