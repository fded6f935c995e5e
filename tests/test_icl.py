"""truedepth.measure.eval.icl: lm-evaluation-harness on in-memory (transformed) models, and the offline tasks."""

import json
import math
import random

import pytest
import torch
from helpers.tiny import char_tokenizer, tiny_model

import truedepth
from truedepth.measure.eval import icl, tasks
from truedepth.utils.errors import InputPathError

pytest.importorskip("lm_eval")


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Tiny local tasks: multiple choice and last-word, from JSON files
# ---------------------------------------------------------------------------------------------
def write_tiny_tasks(folder):
    rng = random.Random(0)
    words = ["apple", "stone", "river", "cloud", "tea", "lamp", "sea", "bright", "oak", "mist"]
    mc, lw = [], []
    for i in range(12):
        choices = rng.sample(words, 4)
        mc.append(
            {
                "question": f"Q{i}: which {rng.choice(words)} is {rng.choice(words)}?",
                "choices": choices,
                "answer": rng.randrange(4),
            }
        )
        lw.append({"context": " ".join(rng.choice(words) for _ in range(6)), "target": rng.choice(words)})
    for name, rows in (("mc", mc), ("lw", lw)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'mc.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tiny_lastword.yaml").write_text(
        "task: tiny_lastword\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'lw.jsonl'}\n"
        'test_split: test\noutput_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
        'doc_to_target: "{{\' \' + target}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return mc, lw


@torch.no_grad()
def continuation_logprob(model, tokenizer, context, continuation):
    """log p(continuation | context) and whether every continuation token is the arg-max."""
    ctx, cont = encode(tokenizer, context), encode(tokenizer, continuation)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1].double(), -1)
    target = torch.tensor(cont)
    picked = logp[torch.arange(len(cont)), target]
    return picked.sum().item(), bool((logp.argmax(-1) == target).all())


def direct_mc_accuracy(model, tokenizer, docs):
    hits = 0
    for d in docs:
        scores = [continuation_logprob(model, tokenizer, d["question"], " " + c)[0] for c in d["choices"]]
        hits += max(range(4), key=lambda k: scores[k]) == d["answer"]
    return hits / len(docs)


def direct_lastword(model, tokenizer, docs):
    """(accuracy, perplexity) of the last-word docs: greedy hits, and exp(-mean log p(word))."""
    scored = [continuation_logprob(model, tokenizer, d["context"], " " + d["target"]) for d in docs]
    return sum(g for _, g in scored) / len(docs), math.exp(-sum(lp for lp, _ in scored) / len(docs))


def test_harness_scores_equal_a_direct_loglikelihood_computation(tmp_path):
    """Base model and an LP-transformed one: the in-memory object is what lm-eval scores."""
    mc, lw = write_tiny_tasks(tmp_path)
    tokenizer = char_tokenizer()
    perplexities = []
    for plan in ("base", "parallel=2:6"):
        model = truedepth.apply_plan(tiny_model("llama", layers=8, seed=1), plan)
        got = icl.evaluate_tasks(model, tokenizer, ["tiny_mc", "tiny_lastword"], include_path=tmp_path, batch_size=4)
        acc, ppl = direct_lastword(model, tokenizer, lw)
        assert got["tiny_mc"]["acc"] == pytest.approx(direct_mc_accuracy(model, tokenizer, mc), abs=1e-12)
        assert got["tiny_lastword"]["acc"] == pytest.approx(acc, abs=1e-12)
        assert got["tiny_lastword"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert got["tiny_mc"]["n_samples"] == 12 and got["tiny_mc"]["num_fewshot"] == 0
        json.dumps(got)  # JSON-serialisable as promised
        perplexities.append(ppl)
    assert perplexities[0] != pytest.approx(perplexities[1], rel=1e-3)  # the plan really changed the model


def test_bad_input_fails_before_any_model_work(tmp_path):
    write_tiny_tasks(tmp_path)
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'tiny_mcq' \(did you mean tiny_mc"):
        icl.evaluate_tasks(None, None, ["tiny_mcq"], include_path=tmp_path)
    with pytest.raises(ValueError, match="num_fewshot must be an integer >= 0"):
        icl.evaluate_tasks(None, None, ["tiny_mc"], num_fewshot=-1, include_path=tmp_path)
    with pytest.raises(ValueError, match="limit must be"):
        icl.evaluate_tasks(None, None, ["tiny_mc"], limit=0, include_path=tmp_path)
    with pytest.raises(ValueError, match="no task given"):
        icl.evaluate_tasks(None, None, " , ")
    with pytest.raises(InputPathError, match="task folder"):
        icl.evaluate_tasks(None, None, ["tiny_mc"], include_path=tmp_path / "missing")


def test_clean_results_flattens_lm_eval_keys():
    raw = {
        "results": {
            "g": {"alias": "g", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_count": None},
            "t": {"alias": " - t", "acc,none": 0.25, "exact_match,strict": 1.0},
        },
        "groups": {"g": {}},
        "group_subtasks": {"g": ["t"]},
        "n-samples": {"t": {"original": 10, "effective": 4}},
        "n-shot": {"t": 5},
    }
    out = icl.clean_results(raw)
    assert out == {
        "g": {"acc": 0.5, "acc_stderr": None, "n_samples": 4},
        "t": {"acc": 0.25, "exact_match,strict": 1.0, "n_samples": 4, "num_fewshot": 5},
    }
    assert icl.headline(out, "t") == ("acc", 0.25)


# ---------------------------------------------------------------------------------------------
# The shipped tasks
# ---------------------------------------------------------------------------------------------
def test_shipped_mmlu_yaml_files_are_up_to_date():
    for rel, text in tasks.mmlu_yaml_files().items():
        assert (tasks.TASKS_DIR / rel).read_text() == text, (
            f"regenerate with truedepth.measure.eval.tasks.write_yaml_files(): {rel}"
        )


def test_mmlu_splits_cover_every_question_once():
    from truedepth.measure.eval.data import mmlu_rows

    rows = mmlu_rows()
    dev = test = 0
    for subject in tasks.MMLU_SUBJECTS:
        d, t = tasks.mmlu_splits(subject)
        assert len(d) == 5 and all(doc["subject"] == subject for doc in d + t)
        dev, test = dev + len(d), test + len(t)
    assert dev + test == len(rows) and dev == 5 * 57
    first = next(r for r in rows if r["topic"] == "anatomy")
    doc = tasks.mmlu_splits("anatomy")[0][0]
    assert (
        doc["question"] == first["question"]
        and doc["choices"][doc["answer"]] == first["answer_" + first["correct_answer"].lower()]
    )


def test_mmlu_task_through_the_harness_uses_dev_questions_as_shots():
    manager = icl.task_manager(["truedepth_mmlu"])
    assert {"truedepth_mmlu", "truedepth_mmlu_stem", "truedepth_mmlu_anatomy", "truedepth_austen_lastword"} <= set(
        manager.all_tasks
    )
    task = manager.load(["truedepth_mmlu_anatomy"])["tasks"]["truedepth_mmlu_anatomy"]
    dev, test = tasks.mmlu_splits("anatomy")
    docs = list(task.test_docs())
    assert len(docs) == len(test) and docs[0]["question"] == test[0]["question"]
    prompt = task.fewshot_context(docs[0], num_fewshot=5)
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.")
    for shot in dev:  # the five dev questions, in order, each with its answer letter
        assert f"{shot['question'].strip()}\nA. " in prompt
    assert prompt.index(dev[0]["question"].strip()) < prompt.index(dev[4]["question"].strip())
    assert prompt.endswith(f"D. {docs[0]['choices'][3]}\nAnswer:")


def chapter(n):
    filler = "Every morning the light came early over the hills and the fields. " * 14
    return (
        f"Chapter {n}\n\n"
        + "The garden was quiet and the old gardener walked past the roses. " * 3
        + "He liked the garden more than the house.\n\nShe said nothing, but she thought of the garden. "
        + filler
        + "In the evening she went back to the garden.\n\n"
        + filler
        + "Nobody had ever seen such hills.\n\n"
    )


NOVEL = chapter(1) + chapter(2) + chapter(3)


def test_lastword_items_are_recoverable_from_their_context():
    items = tasks.lastword_items(NOVEL)
    assert items and items == tasks.lastword_items(NOVEL)  # deterministic
    for it in items:
        assert it["target"].isalpha() and it["target"].lower() in it["context"].lower()
        assert not it["context"].endswith(" ") and "Chapter" not in it["context"]
        assert len(it["context"].split()) >= tasks.LASTWORD_MIN_CONTEXT_WORDS
    # "...back to the garden." is left out: its 150-word context is all filler, without "garden"
    assert {it["target"] for it in items} == {"fields", "hills"}
    chance = tasks.lastword_chance(items)
    assert 0 < chance["random_context_word"] < 1


@pytest.mark.integration
def test_lastword_on_the_default_model_is_far_above_chance_with_and_without_a_plan():
    torch.set_num_threads(1)
    model, tokenizer = truedepth.load("default")
    chance = tasks.lastword_chance(tasks.lastword_items())["random_context_word"]
    base = icl.evaluate_tasks(model, tokenizer, ["truedepth_austen_lastword"], limit=20)
    planned = icl.evaluate_tasks(
        truedepth.apply_plan(model, "parallel=24:28"), tokenizer, ["truedepth_austen_lastword"], limit=20
    )
    assert base["truedepth_austen_lastword"]["acc"] > 5 * chance
    assert planned["truedepth_austen_lastword"]["acc"] > 5 * chance
    assert base["truedepth_austen_lastword"]["n_samples"] == 20
