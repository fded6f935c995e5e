"""Data-free distillation text (apps.finetune.selfdata) and fitting the fine-tune's tokens to its time."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import char_tokenizer, tiny_model
from test_finetune import student_and_base

from truedepth.apps.finetune import pipeline as ft_run
from truedepth.apps.finetune import selfdata
from truedepth.apps.finetune import train as ft_train
from truedepth.apps.finetune.config import TrainConfig
from truedepth.apps.finetune.model import Teacher, freeze_all_but
from truedepth.utils.errors import InputPathError, UserError


def test_generation_is_seeded_resumable_and_starts_from_bos(tmp_path):
    model, tok = tiny_model("llama", layers=2, seed=3), char_tokenizer()
    first = selfdata.generate_text(
        model, tok, tmp_path / "a", tokens=3 * 4 * 16, batch_size=4, length=16, progress=False
    )
    assert first["parts"] == 3 and first["tokens"] == 192
    # an interrupted run keeps its finished parts: delete the last one and only it is made again
    parts = selfdata.finished_parts(tmp_path / "a")
    kept = [p.read_text() for p in parts]
    parts[-1].unlink()
    again = selfdata.generate_text(model, tok, tmp_path / "a", tokens=192, batch_size=4, length=16, progress=False)
    assert again["parts"] == 3 and [p.read_text() for p in selfdata.finished_parts(tmp_path / "a")] == kept
    # each part is the model's own sampling from BOS with its seed: an independent call gives the same samples
    torch.manual_seed(selfdata.part_seed(0, 1))
    ids = torch.full((4, 1), tok.bos_token_id)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=0,
            max_new_tokens=16,
            min_new_tokens=16,
            pad_token_id=tok.eos_token_id,
        )
    expected = selfdata.SEPARATOR.join(tok.batch_decode(out[:, 1:], skip_special_tokens=True)) + selfdata.SEPARATOR
    assert kept[1] == expected
    assert selfdata.read_generated(tmp_path / "a") == "".join(kept)


def test_generation_stops_at_its_time_limit_keeping_what_it_wrote(tmp_path):
    model, tok = tiny_model("llama", layers=2, seed=3), char_tokenizer()
    done = selfdata.generate_text(
        model, tok, tmp_path, tokens=10**6, batch_size=2, length=8, max_seconds=0, progress=False
    )
    assert done["stopped_by"] == "time" and done["parts"] == 0
    with pytest.raises(InputPathError, match="holds no generated text"):
        selfdata.read_generated(tmp_path)


POOLS = {
    "wordnet": ("scorch, singe (noun): a surface burn", "parented (adjective): having a parent"),
    "fortune": ("Patience is a minor form of despair, disguised as virtue.",),
    "mmlu": ("Answer this question about anatomy and explain your answer.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6",),
}


def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


def test_chat_generation_is_seeded_resumable_and_renders_each_exchange(tmp_path, monkeypatch):
    from truedepth.measure.eval.fidelity import greedy_answers

    monkeypatch.setattr(selfdata, "question_pools", lambda: POOLS)
    model, tok = tiny_model("llama", layers=2, seed=3), chat_tokenizer()
    run = dict(tokens=400, batch_size=3, length=12, progress=False, source="chat")
    first = selfdata.generate_text(model, tok, tmp_path / "a", **run)
    parts = selfdata.finished_parts(tmp_path / "a")
    kept = [p.read_text() for p in parts]
    count = [len(tok(k, add_special_tokens=False)["input_ids"]) for k in kept]
    assert first["parts"] == len(parts) >= 2 and first["tokens"] == sum(count) >= 400 > sum(count[:-1])
    parts[-1].unlink()
    again = selfdata.generate_text(model, tok, tmp_path / "a", **run)
    assert (
        again["tokens"] == first["tokens"] and [p.read_text() for p in selfdata.finished_parts(tmp_path / "a")] == kept
    )
    # part 1: the questions its seed draws, each followed by the answer the model samples with that seed
    seed = selfdata.part_seed(0, 1)
    questions = selfdata.chat_questions(3, seed)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    torch.manual_seed(seed)
    answers = greedy_answers(model, tok, prompts, 12, 3, progress=False, temperature=0.7, top_p=0.9)
    expected = [f"<s>user\n{q}</s>\n<s>assistant\n{a.strip()}</s>\n" for q, a in zip(questions, answers)]
    assert kept[1] == selfdata.SEPARATOR.join(expected) + selfdata.SEPARATOR
    assert any(a.strip() for a in answers)
    with pytest.raises(UserError, match="no chat template.*--generate-from bos"):
        selfdata.generate_text(model, char_tokenizer(), tmp_path / "b", **run)
    assert not (tmp_path / "b").exists()


def test_chat_questions_come_from_every_kind_of_material_and_never_an_mmlu_test_question():
    from truedepth.measure.eval.tasks import MMLU_SUBJECTS, mmlu_splits

    pools = selfdata.question_pools()
    assert 250 < len(pools["mmlu"]) < 5 * len(MMLU_SUBJECTS) and len(pools["wordnet"]) > 100_000
    tested = {d["question"].strip() for s in MMLU_SUBJECTS for d in mmlu_splits(s)[1]}
    assert not any(q.split("\n\n", 1)[1].split("\nA. ")[0] in tested for q in pools["mmlu"])
    questions = selfdata.chat_questions(400, seed=7)
    assert questions == selfdata.chat_questions(400, seed=7) != selfdata.chat_questions(400, seed=8)
    assert sum(q.startswith("What does the ") for q in questions) > 50  # a word to define
    assert sum(q.startswith("What does this mean?") for q in questions) > 50  # a fortune to explain
    assert sum(q.startswith("Answer this question about ") for q in questions) > 50  # MMLU
    assert sum(any(q.startswith(t.split("{}")[0]) for t in selfdata._ASK_ABOUT) for q in questions) > 50


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_mix_holds_the_asked_share_of_the_corpus_in_evenly_spread_chunks(share):
    generated, corpus = "g" * 40_000, "abcdef" * 40_000
    mixed = selfdata.mix_texts(generated, corpus, share, chunk_chars=1000)
    from_corpus = len(mixed) - mixed.count("g") - mixed.count("\n")
    assert from_corpus / (from_corpus + mixed.count("g")) == pytest.approx(share, abs=0.02)
    assert mixed.count("g") == len(generated)  # every generated character, once
    # chunks alternate with generated text from start to end
    assert mixed.startswith("g") and "g" in mixed[-3000:]
    assert selfdata.mix_texts(generated, corpus, 0) == generated
    short = selfdata.mix_texts(generated, "abcdef" * 100, share, chunk_chars=1000)  # a short corpus wraps around
    assert (len(short) - short.count("g") - short.count("\n")) / len(generated) == pytest.approx(
        share / (1 - share), abs=0.05
    )
    with pytest.raises(ValueError, match="share"):
        selfdata.mix_texts(generated, corpus, 1.0)


def test_timing_a_step_leaves_weights_and_gradients_untouched():
    student, base, layers = student_and_base()
    freeze_all_but(student, layers)
    teacher = Teacher(base)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids = torch.randint(0, 100, (2, 16))
    seconds = ft_train.time_training_step(student, teacher, ids, TrainConfig(loss="distill"), "cpu", torch.float32)
    assert seconds > 0
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n


def test_fitted_tokens_fill_the_time_limit(monkeypatch):
    monkeypatch.setattr(ft_run, "time_training_step", lambda *a, **k: 2.0)
    cfg = TrainConfig(seq_len=32, batch_size=4, max_minutes=10)
    ft_run.fit_tokens_to_minutes(None, None, FakeBatches(), cfg, "cpu", torch.float32)
    steps = int(ft_run.FIT_MARGIN * 600 / 2.0)
    assert cfg.tokens == steps * 128 and cfg.total_steps == steps
    with pytest.raises(ValueError, match="needs --max-minutes"):
        ft_run.fit_tokens_to_minutes(None, None, FakeBatches(), TrainConfig(), "cpu", torch.float32)


class FakeBatches:
    def batch(self, step):
        return torch.zeros(4, 32, dtype=torch.long)


@pytest.mark.parametrize("extra", [[], ["--max-minutes", "5", "--tokens", "4096"]])
def test_fit_tokens_needs_a_time_limit_and_no_token_count(tmp_path, capsys, extra):
    from truedepth import cli

    assert cli.main(["finetune", "--plan", "parallel=2:4", "--fit-tokens", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fit-tokens sets --tokens from the time limit" in err[0]
    assert not (tmp_path / "o").exists()
