"""`truedepth finetune`: trainable set, losses, teacher, resumable checkpoints, bad input, CLI round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers.tiny import char_tokenizer, tiny_model

import truedepth
from truedepth import cli
from truedepth.apps.finetune import checkpoint as ft_checkpoint
from truedepth.apps.finetune import config as ft_config
from truedepth.apps.finetune import model as ft_model
from truedepth.apps.finetune import pipeline as ft_run
from truedepth.apps.finetune import train as ft_train
from truedepth.apps.finetune.blockloss import BlockMatch
from truedepth.utils.errors import InputPathError, UserError

PLAN = "parallel=2:6"  # 8 layers -> keep 0, keep 1, wide(2,3), wide(4,5), keep 6, keep 7
pytestmark = pytest.mark.usefixtures("private_cache")  # tiny_dir: tests/conftest.py


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def text_file(path: Path, seed: int, chars: int = 6000) -> Path:
    g = torch.Generator().manual_seed(seed)
    words = ["the", "a", "lady", "said", "Mr.", "Darcy", "was", "not", "very", "happy", "ball", "and", "\n"]
    idx = torch.randint(len(words), (chars // 4,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx))
    return path


def random_ids(n=3000, seed=0):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def student_and_base(neighbours=0, plan=PLAN, arch="llama", seed=0):
    base = tiny_model(arch, layers=8, seed=seed)
    student = ft_model.build_student(base, plan, neighbours)
    layers = ft_model.trainable_layer_indices(student.config.truedepth["layer_widths"], neighbours)
    ft_model.freeze_all_but(student, layers)
    return student, base, layers


def trained(model):
    return {k: v.detach().clone() for k, v in ft_train.trainable_state(model).items()}


@pytest.mark.integration
def test_training_text_tokenised_in_pieces_equals_the_whole_text():
    """Pieces keep memory flat; their ids must be those of one call on the whole text, blank lines,
    verse and the fortunes' layout included (a cut after a blank line would merge its newlines)."""
    from transformers import AutoTokenizer

    from truedepth.core.loading import resolve
    from truedepth.measure.eval.data import load_text

    tok = AutoTokenizer.from_pretrained(resolve("default"))
    text = load_text("austen-train+fortunes")[:300_000]
    pieces = list(ft_train.text_pieces(text, 3000))
    assert "".join(pieces) == text and len(pieces) > 50
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert ft_train.tokenize_text(tok, text, chunk_chars=3000).tolist() == whole
    assert ft_train.tokenize_text(tok, "").tolist() == []


# ---------------------------------------------------------------------------------------------
# what trains, and the teacher
# ---------------------------------------------------------------------------------------------
def test_only_wide_layers_train_and_neighbours_add_the_adjacent_layers():
    student, _, layers = student_and_base()
    assert layers == [2, 3] == ft_model.wide_layer_indices(student)
    names = ft_model.freeze_all_but(student, layers)
    assert names and all(n.split(".")[2] in ("2", "3") for n in names)
    assert sum(p.numel() for n, p in student.named_parameters() if p.requires_grad) == sum(
        p.numel() for i in (2, 3) for p in student.model.layers[i].parameters()
    )
    assert ft_model.trainable_layer_indices(student.config.truedepth["layer_widths"], 1) == [1, 2, 3, 4]
    assert ft_model.trainable_layer_indices([1, 1, 2, 1, 3, 1, 1], 2) == [0, 1, 2, 3, 4, 5, 6]


def test_train_last_adds_the_last_layers_and_a_private_final_norm_and_untied_head():
    assert ft_model.trainable_layer_indices([1, 1, 2, 1, 2, 1, 1], last=2) == [2, 4, 5, 6]
    assert ft_model.trainable_layer_indices([1, 2, 1], last=9) == [0, 1, 2]
    base = tiny_model("llama", layers=8, seed=0)
    norm_before = base.model.norm.weight.detach().clone()
    student = ft_model.build_student(base, PLAN, last=2)
    layers = ft_model.trainable_layer_indices(student.config.truedepth["layer_widths"], last=2)
    assert layers == [2, 3, 4, 5]  # 6 layers after the plan: wide 2, 3 and the last two, 4 and 5
    names = ft_model.freeze_all_but(student, layers, head=True)
    assert {"model.norm.weight", "lm_head.weight"} <= set(names) and not any(
        n.startswith("model.layers.1.") for n in names
    )
    assert "model.embed_tokens.weight" not in names
    assert student.model.norm.weight is not base.model.norm.weight  # trained: the teacher keeps its own
    assert student.lm_head.weight is not base.lm_head.weight
    tied = tiny_model("llama", layers=8, seed=0, tie_word_embeddings=True)
    tied_student = ft_model.build_student(tied, PLAN, last=2)
    names = ft_model.freeze_all_but(tied_student, layers, head=True)
    assert "model.norm.weight" in names and "lm_head.weight" not in names  # the input embeddings stay
    assert tied_student.lm_head.weight is tied.lm_head.weight is tied.model.embed_tokens.weight
    assert student.model.layers[1].mlp.up_proj.weight is base.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        student.model.norm.weight.add_(1.0)
        student.model.layers[5].mlp.down_proj.weight.mul_(2.0)
    assert torch.equal(base.model.norm.weight, norm_before)
    # the original model still gives its own logits, through the teacher that starts at the split
    split = ft_model.shared_prefix_length(truedepth.as_plan(PLAN).blocks(8), layers)
    teacher = ft_model.Teacher(base, student.model.layers, split)
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        student(input_ids=ids, use_cache=False)
        got = teacher(ids)
    torch.testing.assert_close(got, tiny_model("llama", layers=8, seed=0)(ids).logits, rtol=0, atol=1e-6)
    teacher.close()


def test_student_shares_frozen_weights_and_leaves_the_base_model_intact():
    base = tiny_model("llama", layers=8, seed=0)
    ids = torch.randint(3, 128, (2, 12))
    before = base(ids).logits
    reference = truedepth.apply_plan(copy.deepcopy(base), PLAN)(ids).logits
    student = ft_model.build_student(base, PLAN)
    assert torch.equal(base(ids).logits, before)  # still the original model (teacher, 'base' perplexity)
    assert torch.equal(student(ids).logits, reference)
    assert student.model.embed_tokens.weight is base.model.embed_tokens.weight
    assert student.model.layers[0].mlp.up_proj.weight is base.model.layers[0].mlp.up_proj.weight
    base_ids = {id(p) for p in base.parameters()}
    assert not any(id(p) in base_ids for p in student.model.layers[2].parameters())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("plan,neighbours", [(PLAN, 0), (PLAN, 1), ("parallel=0:4", 0), ("skip=1,parallel=4:6", 0)])
def test_teacher_logits_equal_the_original_model(arch, plan, neighbours):
    """The teacher that starts from the student's hidden state gives the original model's logits."""
    student, base, layers = student_and_base(neighbours, plan, arch)
    split = ft_model.shared_prefix_length(truedepth.as_plan(plan).blocks(8), layers)
    assert split == {PLAN: 2 - neighbours, "parallel=0:4": 0, "skip=1,parallel=4:6": 1}[plan]
    teacher = ft_model.Teacher(base, student.model.layers, split)
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        student(input_ids=ids, use_cache=False)
        got = teacher(ids)
        want = base(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    teacher.close()


def test_losses_match_independent_computations():
    student, base, _ = student_and_base()
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        s, t = student(ids).logits, base(ids).logits
    assert torch.allclose(ft_train.lm_loss(s, ids), student(ids, labels=ids).loss, atol=1e-6)
    p = torch.softmax(t.double(), -1)
    kl = (p * (torch.log_softmax(t.double(), -1) - torch.log_softmax(s.double(), -1))).sum(-1).mean()
    assert torch.allclose(ft_train.distill_loss(s, t).double(), kl, atol=1e-6)
    assert float(ft_train.distill_loss(t, t)) == pytest.approx(0, abs=1e-6)


def test_batches_depend_only_on_the_step_and_cover_every_sequence():
    data = ft_train.TokenBatches(torch.arange(100), seq_len=10, batch_size=3, seed=0)
    assert data.num_sequences == 10
    first_epoch = torch.cat([data.batch(k) for k in range(3)] + [data.batch(3)[:1]])
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 100, 10))
    again = ft_train.TokenBatches(torch.arange(100), seq_len=10, batch_size=3, seed=0)
    assert torch.equal(again.batch(7), data.batch(7))
    assert not torch.equal(ft_train.TokenBatches(torch.arange(100), 10, 3, seed=1).batch(0), data.batch(0))


# ---------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def kill_at(monkeypatch, step):
    """Make the training loop die inside step `step` (counted from 1), like a SIGKILL would."""
    real, calls = ft_train._train_step, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(ft_train, "_train_step", dying)


def fresh(loss, lora):
    student, base, layers = student_and_base()
    model = ft_model.add_lora(student, layers, 4, 8) if lora else student
    teacher = ft_model.Teacher(base, student.model.layers, 2) if loss in ft_config.TEACHER_LOSSES else None
    if loss == "blocks":
        teacher.blocks = BlockMatch(student.model.layers, base.model.layers, ft_model.wide_members(PLAN, 8), local=True)
    return model, teacher


@pytest.mark.parametrize("loss,lora", [("lm", False), ("distill", False), ("lm", True), ("blocks", False)])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, loss, lora):
    cfg = ft_config.TrainConfig(
        loss=loss,
        seq_len=16,
        batch_size=4,
        tokens=16 * 4 * 12,
        lr=3e-3,
        checkpoint_every=5,
        lora=lora,
        lora_rank=4,
        lora_alpha=8,
    )
    data = ft_train.TokenBatches(random_ids(), cfg.seq_len, cfg.batch_size)
    model, teacher = fresh(loss, lora)
    start = trained(model)
    full = ft_train.train(model, teacher, data, cfg, tmp_path / "full", progress=False)
    want = trained(model)
    assert full.finished and full.step == 12
    assert any(not torch.equal(want[k], start[k]) for k in want)

    model, teacher = fresh(loss, lora)
    kill_at(monkeypatch, 8)
    with pytest.raises(Killed):
        ft_train.train(model, teacher, data, cfg, tmp_path / "killed", progress=False)
    assert [p.name for p in ft_checkpoint.checkpoint_dirs(tmp_path / "killed")] == ["step-00000005"]
    monkeypatch.undo()
    model, teacher = fresh(loss, lora)  # a new process: everything rebuilt from scratch
    resumed = ft_train.train(model, teacher, data, cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed.finished and resumed.step == 12
    got = trained(model)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = ft_config.TrainConfig(loss="lm", seq_len=16, batch_size=4, tokens=16 * 4 * 12, lr=3e-3, checkpoint_every=4)
    data = ft_train.TokenBatches(random_ids(), cfg.seq_len, cfg.batch_size)
    real, writes = ft_checkpoint._write_bytes, {"n": 0}

    def dying_write(path, payload):
        writes["n"] += 1
        if writes["n"] == 6:  # the second file of the second checkpoint (4 files per checkpoint)
            real(path, payload[: len(payload) // 2])  # half written, then the process dies
            raise Killed
        real(path, payload)

    monkeypatch.setattr(ft_checkpoint, "_write_bytes", dying_write)
    model, _ = fresh("lm", False)
    with pytest.raises(Killed):
        ft_train.train(model, None, data, cfg, tmp_path, progress=False)
    monkeypatch.undo()
    assert [p.name for p in ft_checkpoint.checkpoint_dirs(tmp_path)] == ["step-00000004"]
    assert list((tmp_path / "checkpoints").glob(".tmp-*"))  # the torn write stays aside, never loaded
    state = ft_checkpoint.load_checkpoint(ft_checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 4
    model, _ = fresh("lm", False)
    ft_train.train(model, None, data, cfg, tmp_path, resume=True, progress=False)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # cleaned by the next save
    assert [p.name for p in ft_checkpoint.checkpoint_dirs(tmp_path)] == ["step-00000004", "step-00000008"]

    reference, _ = fresh("lm", False)
    ft_train.train(reference, None, data, cfg, None, progress=False)
    for k, v in trained(reference).items():
        assert torch.equal(trained(model)[k], v)


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    cfg = ft_config.TrainConfig(
        loss="lm", seq_len=16, batch_size=2, tokens=16 * 2 * 7, checkpoint_every=2, keep_checkpoints=2
    )
    data = ft_train.TokenBatches(random_ids(), cfg.seq_len, cfg.batch_size)
    model, _ = fresh("lm", False)
    ft_train.train(model, None, data, cfg, tmp_path, progress=False, stop_after=5)
    dirs = ft_checkpoint.checkpoint_dirs(tmp_path)
    assert [p.name for p in dirs] == ["step-00000004", "step-00000005"]  # keep 2; stop saves its progress
    files = sorted(p.name for p in dirs[-1].iterdir())
    assert files == ["optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    state = ft_checkpoint.load_checkpoint(dirs[-1])
    assert state["step"] == 5 and state["tokens"] == 5 * 32 and len(state["history"]) == 5
    optimizer = torch.optim.AdamW(list(ft_train.trainable_state(model).values()), betas=(0.9, 0.95), foreach=False)
    optimizer.load_state_dict(state["optimizer"])  # flattened state loads back into AdamW


def test_resume_refuses_a_different_trajectory(tmp_path):
    cfg = ft_config.TrainConfig(loss="lm", seq_len=16, batch_size=2, tokens=16 * 2 * 4, checkpoint_every=2)
    data = ft_train.TokenBatches(random_ids(), cfg.seq_len, cfg.batch_size)
    model, _ = fresh("lm", False)
    ft_train.train(model, None, data, cfg, tmp_path, progress=False, stop_after=2)
    model, _ = fresh("lm", False)
    with pytest.raises(ValueError, match=rf"--lr {cfg.lr} \(now 0.001\)"):
        ft_train.train(
            model,
            None,
            data,
            ft_config.TrainConfig(**{**cfg.__dict__, "lr": 1e-3}),
            tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="training data differs"):
        ft_train.train(
            model, None, ft_train.TokenBatches(random_ids(seed=5), 16, 2), cfg, tmp_path, resume=True, progress=False
        )
    with pytest.raises(InputPathError, match="no checkpoint"):
        ft_train.train(model, None, data, cfg, tmp_path / "empty", resume=True, progress=False)


# ---------------------------------------------------------------------------------------------
# bad input, before training
# ---------------------------------------------------------------------------------------------
def test_plan_without_parallel_groups_is_refused():
    for plan in ("base", "skip=3", "merge=2:6,shuffle=6:8"):
        with pytest.raises(ValueError, match="no parallel groups.*--plan parallel=20:28"):
            ft_model.check_plan_has_parallel_groups(plan)


def test_cli_refuses_bad_plan_before_loading_anything(tmp_path, capsys):
    rc = cli.main(
        ["finetune", "--model", str(tmp_path / "missing"), "--plan", "merge=2:6", "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    assert "no parallel groups" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_blocks_loss_on_mixed_attention_before_loading_weights(tmp_path, monkeypatch, capsys):
    from truedepth.core import loading

    path = tmp_path / "mixed"
    tiny_model("qwen3", layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("weights loaded"))
    for extra in (["--loss", "blocks"], ["--loss", "distill", "--block-weight", "1"]):
        rc = cli.main(
            [
                "finetune",
                "--model",
                str(path),
                "--plan",
                "parallel=0:2",
                "--data",
                "austen-train",
                "--out",
                str(tmp_path / "o"),
                *extra,
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and "mixes full_attention, sliding_attention" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()


def test_data_shorter_than_one_sequence_or_batch_is_refused():
    with pytest.raises(ValueError, match="shorter than one sequence of --seq-len 256"):
        ft_train.TokenBatches(torch.arange(100), seq_len=256, batch_size=1)
    with pytest.raises(ValueError, match="fewer than one batch of --batch-size 8"):
        ft_train.TokenBatches(torch.arange(100), seq_len=20, batch_size=8)


def test_batch_too_large_for_memory_is_refused(monkeypatch):
    student, base, _ = student_and_base()
    cfg = ft_config.TrainConfig(loss="distill", seq_len=256, batch_size=64)
    need = ft_model.estimate_training_memory(student, base, cfg)
    assert need["logits"] == 64 * 256 * 128 * 4 * 6
    assert need["optimizer"] == 12 * sum(p.numel() for p in student.parameters() if p.requires_grad)
    monkeypatch.setattr(ft_model, "available_memory", lambda device: need["total"] - 1)
    with pytest.raises(UserError, match=r"lower --batch-size or --seq-len, or use --lora"):
        ft_model.check_memory(student, base, cfg, "cpu")
    monkeypatch.setattr(ft_model, "available_memory", lambda device: need["total"])
    ft_model.check_memory(student, base, cfg, "cpu")


def test_cli_refuses_oversized_batch_before_training(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ft_model, "available_memory", lambda device: 1000)
    monkeypatch.setattr(ft_run, "train", lambda *a, **k: pytest.fail("training started"))
    rc = cli.main(
        [
            "finetune",
            "--model",
            str(tiny_dir),
            "--plan",
            PLAN,
            "--data",
            str(text_file(tmp_path / "t.txt", 0)),
            "--no-eval",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 2
    assert "GiB is free on cpu; lower --batch-size" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the command, end to end on a tiny model
# ---------------------------------------------------------------------------------------------
def finetune_args(tiny_dir, tmp_path, out, *extra):
    train, held, other = (text_file(tmp_path / f"{n}.txt", i) for i, n in enumerate(("train", "held", "other")))
    return [
        "finetune",
        "--model",
        str(tiny_dir),
        "--plan",
        PLAN,
        "--data",
        str(train),
        "--eval-text",
        str(held),
        "--other-text",
        str(other),
        "--eval-tokens",
        "256",
        "--eval-window",
        "32",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--tokens",
        str(32 * 4 * 10),
        "--lr",
        "3e-3",
        "--checkpoint-every",
        "3",
        "--train-dtype",
        "fp32",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def saved_logits(folder, ids):
    model, _ = truedepth.load(folder)
    assert model.config.truedepth["plan"]["plan"] == PLAN
    with torch.no_grad():
        return model(ids).logits


def test_cli_trains_saves_summarises_and_resumes_identically(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "full"
    assert cli.main(finetune_args(tiny_dir, tmp_path, out, "--eval-every", "5")) == 0
    summary = json.loads((out / ft_config.SUMMARY_FILE).read_text())
    assert summary["steps"] == 10 and summary["tokens"] == 1280 and summary["finished"]
    assert summary["loss"] == "distill"  # the default
    assert (out / ft_config.CURVE_FILE).stat().st_size > 0 and not (out / ft_config.CHECKPOINT_DIR).exists()
    for name in ("held_out", "other_domain"):
        p = summary["perplexity"][name]
        assert p["recovered"] == pytest.approx((p["lp"] - p["ft"]) / (p["lp"] - p["base"]))
    assert [e["tokens"] for e in summary["evals"]] == [0, 640]
    ids = torch.randint(3, 100, (1, 20))
    want = saved_logits(out, ids)
    # the saved model scores what the summary says
    model, tok = truedepth.load(out)
    held = (tmp_path / "held.txt").read_text()
    from truedepth.measure.eval.perplexity import perplexity

    assert perplexity(model, tok, held, tokens=256, window=32, progress=False)["perplexity"] == pytest.approx(
        summary["perplexity"]["held_out"]["ft"], rel=1e-6
    )

    killed = tmp_path / "killed"
    kill_at(monkeypatch, 5)
    with pytest.raises(Killed):
        cli.main(finetune_args(tiny_dir, tmp_path, killed, "--eval-every", "5"))
    monkeypatch.undo()
    assert cli.main(["finetune", "--out", str(killed), "--resume", "--lr", "1e-3"]) == 2  # another trajectory
    assert cli.main(["finetune", "--out", str(killed), "--resume", "--quiet"]) == 0  # options from the checkpoint
    torch.testing.assert_close(saved_logits(killed, ids), want, rtol=0, atol=0)
    resumed = json.loads((killed / ft_config.SUMMARY_FILE).read_text())
    assert resumed["perplexity"] == summary["perplexity"] and resumed["evals"] == summary["evals"]
    assert cli.main(finetune_args(tiny_dir, tmp_path, killed)) == 2  # finished run: --overwrite needed


def test_cli_train_last_saves_trained_last_layers_and_norm_and_nothing_else(tiny_dir, tmp_path, capsys):
    out = tmp_path / "last"
    assert cli.main(finetune_args(tiny_dir, tmp_path, out, "--train-last", "1", "--no-eval")) == 0
    assert json.loads((out / ft_config.SUMMARY_FILE).read_text())["config"]["train_last"] == 1
    model, _ = truedepth.load(out)
    lp, _ = truedepth.load(tiny_dir, plan=PLAN)
    state, before = dict(model.named_parameters()), dict(lp.named_parameters())
    layer_of = lambda n: ".".join(n.split(".")[:3]) if n.startswith("model.layers.") else n  # noqa: E731
    changed = {layer_of(n) for n, p in state.items() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.2", "model.layers.3", "model.layers.5", "model.norm.weight", "lm_head.weight"}
    for extra, message in ((["--lora"], "does not combine with --lora"), (["--loss", "blocks"], "--train-last layers")):
        assert cli.main(finetune_args(tiny_dir, tmp_path, tmp_path / "bad", "--train-last", "1", *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_lora_merges_into_a_loadable_model(tiny_dir, tmp_path):
    out = tmp_path / "lora"
    assert (
        cli.main(
            finetune_args(
                tiny_dir, tmp_path, out, "--lora", "--lora-rank", "4", "--loss", "distill", "--train-dtype", "bf16"
            )
        )
        == 0
    )
    summary = json.loads((out / ft_config.SUMMARY_FILE).read_text())
    assert summary["lora"] and summary["train_dtype"] == "bfloat16" and summary["dtype"] == "float32"
    model, _ = truedepth.load(out)
    assert next(model.parameters()).dtype == torch.float32
    assert not any("lora" in n for n, _ in model.named_parameters())
    lp, _ = truedepth.load(tiny_dir, plan=PLAN)
    wide = [n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")]
    frozen = [n for n, _ in model.named_parameters() if n.startswith("model.layers.4.")]
    state, before = dict(model.named_parameters()), dict(lp.named_parameters())
    assert any(not torch.equal(state[n], before[n]) for n in wide)  # adapters merged into the wide layer
    assert all(torch.equal(state[n], before[n]) for n in frozen)


def test_already_transformed_model_keeps_training_with_lm_only(tiny_dir, tmp_path, capsys):
    out = tmp_path / "first"
    assert cli.main(finetune_args(tiny_dir, tmp_path, out, "--no-eval")) == 0
    args = finetune_args(out, tmp_path, tmp_path / "second", "--no-eval")
    args[args.index("--plan") + 1] = "base"
    assert cli.main(args) == 0
    assert truedepth.load(tmp_path / "second")[0].config.truedepth["plan"]["plan"] == PLAN
    assert json.loads((tmp_path / "second" / ft_config.SUMMARY_FILE).read_text())["loss"] == "lm"  # no teacher
    args[args.index("--out") + 1] = str(tmp_path / "third")
    assert cli.main(args + ["--loss", "distill"]) == 2
    assert "teacher" in capsys.readouterr().err


def test_block_weight_is_refused_without_distill_or_teacher(tiny_dir, tmp_path, capsys):
    for extra, message in [
        (["--loss", "lm", "--block-weight", "1"], "adds the blocks loss to --loss distill"),
        (["--block-weight", "-1"], "--block-weight must be >= 0"),
    ]:
        assert cli.main(finetune_args(tiny_dir, tmp_path, tmp_path / "o", "--no-eval", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / ft_config.SUMMARY_FILE).exists()
    out = tmp_path / "first"
    assert cli.main(finetune_args(tiny_dir, tmp_path, out, "--no-eval")) == 0
    args = finetune_args(out, tmp_path, tmp_path / "second", "--no-eval", "--loss", "blocks")
    args[args.index("--plan") + 1] = "base"
    assert cli.main(args) == 2
    assert "teacher of --loss blocks" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--loss", "blocks"], ["--block-weight", "0.5"]])
def test_cli_trains_with_the_blocks_loss_and_reduces_it(tiny_dir, tmp_path, extra):
    out = tmp_path / "o"
    assert cli.main(finetune_args(tiny_dir, tmp_path, out, "--no-eval", *extra)) == 0
    summary = json.loads((out / ft_config.SUMMARY_FILE).read_text())
    config = summary["config"]
    assert (config["loss"], config["block_weight"]) == {"--loss": ("blocks", 0.0), "--block-weight": ("distill", 0.5)}[
        extra[0]
    ]
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.integration
def test_default_model_short_finetune(tmp_path):
    """A few steps on the real default model and training text: runs, saves, reloads."""
    torch.set_num_threads(1)
    out = tmp_path / "ft"
    rc = cli.main(
        [
            "finetune",
            "--plan",
            "parallel=20:28",
            "--tokens",
            "512",
            "--seq-len",
            "128",
            "--batch-size",
            "2",
            "--loss",
            "distill",
            "--no-eval",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    summary = json.loads((out / ft_config.SUMMARY_FILE).read_text())
    assert summary["steps"] == 2 and all(h["loss"] > 0 for h in summary["history"])
    model, _ = truedepth.load(out)
    assert model.config.num_hidden_layers == 26


def test_base_and_lp_perplexities_are_measured_once_per_model_and_texts(tiny_dir, tmp_path, monkeypatch):
    calls = []
    from truedepth.measure.eval import heldout

    real = heldout.perplexities
    monkeypatch.setattr(ft_run, "perplexities", lambda model, *a, **k: calls.append(1) or real(model, *a, **k))
    assert cli.main(finetune_args(tiny_dir, tmp_path, tmp_path / "a")) == 0
    assert len(calls) == 3  # base, LP, fine-tuned
    assert cli.main(finetune_args(tiny_dir, tmp_path, tmp_path / "b", "--loss", "distill")) == 0
    assert len(calls) == 4  # base and LP from the cache
    args = finetune_args(tiny_dir, tmp_path, tmp_path / "c")  # (re)writes the text files
    (tmp_path / "held.txt").write_text("the lady said not very " * 300)  # another held-out text
    assert cli.main(args) == 0
    assert len(calls) == 7  # a new text: base and LP measured again
    a, b, c = (json.loads((tmp_path / d / ft_config.SUMMARY_FILE).read_text())["perplexity"] for d in "abc")
    assert a["held_out"]["lp"] == b["held_out"]["lp"] != c["held_out"]["lp"]


@pytest.mark.parametrize(
    "bf16, fp32, want",
    [
        (300e9, 160e9, torch.bfloat16),  # e.g. an AMD EPYC with AVX512-BF16
        (160e9, 276e9, torch.float32),  # an Intel Xeon VM with the same flag
        (110e9, 100e9, torch.float32),
    ],
)  # within 1.2x: not worth bf16
def test_auto_train_dtype_is_bf16_only_where_a_timing_finds_it_faster(monkeypatch, bf16, fp32, want):
    from truedepth.measure.bench import timing
    from truedepth.measure.bench.precision import training_precision

    monkeypatch.setattr(timing, "matmul_flops", lambda device, dtype, **k: bf16 if dtype == torch.bfloat16 else fp32)
    timing.bf16_is_faster.cache_clear()
    try:
        assert training_precision("cpu", None, ft_config.FinetuneOptions().train_dtype)[2] == want
        assert training_precision("cpu", None, "bf16")[2] == torch.bfloat16
    finally:
        timing.bf16_is_faster.cache_clear()
