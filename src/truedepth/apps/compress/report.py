"""What `truedepth compress` leaves besides the model: compress.json, the model card and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...utils.io import atomic_write, atomic_write_json
from ...utils.plotting import pyplot, save_figure
from .budget import BUDGET_SHARES
from .options import SUMMARY_FILE, CompressOptions
from .stages import options_record

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the offline default model is a copy of
COLUMNS = ("base", "contiguous", "searched", "fine-tuned")
LABELS = {
    "base": "base model",
    "contiguous": "contiguous LP (paper), no fine-tuning",
    "searched": "searched plan, no fine-tuning",
    "fine-tuned": "searched plan, fine-tuned",
}
SEARCH_PLOT, QUALITY_PLOT, CARD = "search.png", "quality.png", "README.md"


def base_model_id(model: str) -> str:
    return DEFAULT_HUB_ID if model == "default" else str(model)


def build_summary(opts: CompressOptions, records: dict[str, dict], device: str) -> dict[str, Any]:
    import truedepth

    from ...utils.device import device_and_dtype
    from ...utils.env import machine_info

    search, ft, ev = (records[s]["result"] for s in ("search", "finetune", "evaluate"))
    stages = {
        name: {
            "seconds": r["seconds"],
            "budget_seconds": r["budget_seconds"],
            "share": BUDGET_SHARES[name],
            "finished": r["finished"],
        }
        for name, r in records.items()
    }
    total = sum(r["seconds"] for r in records.values())
    return {
        "model": opts.model,
        "base_model": base_model_id(opts.model),
        "target_depth": opts.target_depth,
        "depth": ev["depth"],
        "plan": search["plan_string"],
        "plan_json": search["plan"],
        "contiguous_plan": ev["contiguous_plan"],
        "command": opts.command,
        "options": options_record(opts),
        "budget_minutes": opts.budget_minutes,
        "total_seconds": round(total, 1),
        "stages": stages,
        "perplexity": ev["perplexity"],
        "eval_tokens": ev["eval_tokens"],
        "eval_window": ev["eval_window"],
        "ratio_to_base": {
            text: {k: v / row["base"] for k, v in row.items() if v is not None and row.get("base")}
            for text, row in ev["perplexity"].items()
        },
        "decode_tokens_per_second": ev["decode_tokens_per_second"],
        "serving": serving_record(records),
        "tasks": ev.get("tasks"),
        "fidelity": ev.get("fidelity"),  # absent from an evaluate stage recorded before it was measured
        "fidelity_tokens": ev.get("fidelity_tokens"),
        "mmlu_chat": ev.get("mmlu_chat"),
        "finetune": {k: v for k, v in ft.items() if k not in ("perplexity", "history")},
        "generate": records["generate"]["result"],
        "corpus_share": opts.corpus_share,
        "search": {
            k: search["summary"].get(k)
            for k in (
                "objective",
                "base_objective",
                "found",
                "forward_passes",
                "search_seconds",
                "selection_seconds",
                "calibration",
            )
        },
        "machine": machine_info(device, device_and_dtype(device, opts.dtype)[1]),  # the dtype evaluated in
        "truedepth": truedepth.__version__,
    }


def serving_record(records: dict[str, dict]) -> dict[str, Any] | None:
    """The serve stage's measurements, when an engine was asked for (absent from runs before the stage existed)."""
    result = records.get("serve", {}).get("result")
    return result if result and result.get("engine") != "transformers" else None


def serving_section(summary: dict[str, Any]) -> str:
    """The model card's section on speed under load in a serving engine (empty without --engine)."""
    from ...measure.bench.serving_report import format_markdown

    serving = summary.get("serving")
    if not serving:
        return ""
    s = serving["settings"]
    return f"""
## Served by {serving["engine"]} under load

{serving["engine"]} {serving["engine_version"]}, {s["dtype"]}, random prompts of {s["prompt"]} tokens and {s["new"]} new
tokens, median (min-max) of {s["repeats"]} repeats, base and compressed model taking turns on the same machine.

{format_markdown(serving["summary"])}

Measure it again (on your machine, your engine): `{serving["command"]}`
"""


def write_report(out: Path, opts: CompressOptions, records: dict[str, dict], device: str) -> dict[str, Any]:
    from ..search import plot as plot_search

    summary = build_summary(opts, records, device)
    plot_search(records["search"]["result"]["summary"], out / SEARCH_PLOT)
    plot_quality(summary, out / QUALITY_PLOT)
    atomic_write(out / CARD, model_card(summary))
    atomic_write_json(out / SUMMARY_FILE, summary)
    return show_report(out, summary)


def show_report(out: Path, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = summary or json.loads((out / SUMMARY_FILE).read_text())
    print(quality_table(summary))
    if summary.get("serving"):
        print(serving_section(summary))
    print(stage_table(summary))
    print(f"saved to {out}: load with truedepth.load('{out}'); {SUMMARY_FILE}, {CARD}, {SEARCH_PLOT}, {QUALITY_PLOT}")
    return summary


def quality_table(summary: dict[str, Any]) -> str:
    """Markdown: perplexity per text and model, with the ratio to the base model."""
    ppl, ratio = summary["perplexity"], summary["ratio_to_base"]
    head = "| text | " + " | ".join(LABELS[c] for c in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for text, row in ppl.items():
        cells = [
            f"{row[c]:.2f}" + (f" ({ratio[text][c]:.3f}x)" if c != "base" else "") if row.get(c) is not None else "n/a"
            for c in COLUMNS
        ]
        rows.append(f"| {text.replace('_', '-')} | " + " | ".join(cells) + " |")
    speed = summary["decode_tokens_per_second"]
    rows.append(
        f"\nDecode speed (batch 1, greedy): base {speed['base']:.1f} tok/s, compressed "
        f"{speed['fine-tuned']:.1f} tok/s ({speed['fine-tuned'] / speed['base']:.2f}x)."
    )
    return "\n".join(rows) + fidelity_table(summary)


def fidelity_table(summary: dict[str, Any]) -> str:
    """Markdown: top-1 agreement with the base model and KL divergence from it, per text and model; the
    MMLU-chat choice agreement. Empty when they were not measured."""
    fidelity, chat, rows = summary.get("fidelity"), summary.get("mmlu_chat"), []
    if fidelity:
        columns = COLUMNS[1:]
        rows += [
            f"\n\nAgreement with the base model on the first {summary['fidelity_tokens']} tokens of each text: top-1 "
            "(the same most likely next token) / KL(base || model) in nats per token.\n",
            "| text | " + " | ".join(LABELS[c] for c in columns) + " |",
            "|" + "---|" * (len(columns) + 1),
        ]
        for text, row in fidelity.items():
            cells = [f"{row[c]['top1_agreement']:.1%} / {row[c]['kl']:.4f}" if row.get(c) else "n/a" for c in columns]
            rows.append(f"| {text.replace('_', '-')} | " + " | ".join(cells) + " |")
    if chat:
        rows.append(
            f"\nMMLU-chat ({chat['questions']} questions, greedy answers through the chat template): the fine-tuned "
            f"model picks the base model's letter on {chat['agreement']:.0%} of them (chance: "
            f"{chat['chance_agreement']:.0%}); accuracy {chat['accuracy']:.0%} "
            f"(base {chat['reference_accuracy']:.0%}); answers without a letter {chat['unparsed']} "
            f"(base {chat['reference_unparsed']})."
        )
    return "\n".join(rows)


def stage_table(summary: dict[str, Any]) -> str:
    rows = ["| stage | minutes | planned minutes |", "|---|---|---|"]
    for name, s in summary["stages"].items():
        rows.append(f"| {name} | {s['seconds'] / 60:.1f} | {s['budget_seconds'] / 60:.1f} |")
    rows.append(f"| total | {summary['total_seconds'] / 60:.1f} | {summary['budget_minutes']:g} |")
    return "\n".join(rows)


def model_card(summary: dict[str, Any]) -> str:
    """A Hugging Face model card: YAML header (base_model, tags), what was done, quality, how to use it."""
    ft, m = summary["finetune"], summary["machine"]
    removed = summary["depth"]["base"] - summary["depth"]["fine-tuned"]
    tasks = ""
    if summary.get("tasks"):
        tasks = "\n## lm-eval tasks\n\n```json\n" + json.dumps(summary["tasks"], indent=1, default=str) + "\n```\n"
    return f"""---
base_model: {summary["base_model"]}
library_name: transformers
tags:
- truedepth
- layer-parallelism
- depth-compression
- distillation
---

# {summary["base_model"].split("/")[-1]} at depth {summary["depth"]["fine-tuned"]} (truedepth Layer Parallelism)

{summary["base_model"]} ({summary["depth"]["base"]} layers) made {removed} layers shallower with
`truedepth compress`: groups of consecutive layers read the same input and run as one wide layer.

- **Plan** (found by `truedepth search`, calibrated on training text only): `{summary["plan"]}`
- **Fine-tuning**: only the wide layers, loss `{ft["loss"]}`, {ft["steps"]} steps, {ft["tokens"]} tokens,
  {ft["train_seconds"] / 60:.1f} min{" (stopped by the time budget)" if ft["stopped_by"] == "max_minutes" else ""}, on
  {training_text(summary)}.
- **Command**: `{summary["command"]}`
- **Machine**: {m.get("cpu")} ({m.get("cores")} cores), device {m.get("device")}, torch {m.get("torch")},
  transformers {m.get("transformers")}, load average {m.get("load_average")}, {m.get("date")}.

## Quality

Perplexity, first {summary["eval_tokens"]} tokens in windows of {summary["eval_window"]} (ratio to the base model).
The contiguous plan is the paper's scheme at the same depth (`{summary["contiguous_plan"]}`).

{quality_table(summary)}

![quality](quality.png)
{tasks}{serving_section(summary)}
## Time per stage

{stage_table(summary)}

## Use

```python
import truedepth
model, tokenizer = truedepth.load("path/to/this/folder")   # registers the truedepth model classes
```

```bash
truedepth eval --model path/to/this/folder --text default
truedepth generate --model path/to/this/folder "Once upon a time"
vllm serve path/to/this/folder                      # with truedepth installed: its vLLM plugin serves it
truedepth export --model path/to/this/folder --gguf model.gguf --type q8_0   # for llama.cpp / Ollama
```

Where LP pays: a fused wide layer reads the same weight bytes and does the same FLOPs as the layers
it replaces, so it saves only per-layer work (attention calls, norms, kernel launches; all-reduces under
tensor parallelism). On a 2-core CPU in vLLM that was 6-10 % more output tokens/s at concurrency 1-16
for a depth-24 plan of SmolLM2-135M, about the same at every level; at tensor-parallel size 2 (a
Qwen2.5-0.5B shape) 5-13 % less time per output token at concurrency 1-8; in llama.cpp's server nothing
(0.95-1.01x) (truedepth docs/SERVING.md, 2026-12-05). Measure your own set-up with
`truedepth bench --engine vllm` (or `--engine llama.cpp`).

The folder is an ordinary truedepth model (safetensors, `config.truedepth` records the plan).
Everything measured is in `compress.json`.
"""


def training_text(summary: dict[str, Any]) -> str:
    gen, share, data = summary["generate"], summary["corpus_share"], summary["options"]["data"]
    if not gen.get("tokens"):
        return f"`{data}`"
    how = (
        "its answers to questions through its chat template: self-distillation"
        if gen.get("source") == "chat"
        else "sampled from BOS at temperature 1: data-free distillation"
    )
    generated = f"{1 - share:.0%} text the base model generated itself ({gen['tokens']:,} tokens, {how})"
    return f"{generated} and {share:.0%} `{data}`"


def plot_quality(summary: dict[str, Any], path: Path) -> None:
    """Base / contiguous LP / searched / fine-tuned perplexity side by side, one group per text."""
    plt = pyplot(optional=True)
    if plt is None:
        return
    texts = list(summary["perplexity"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(COLUMNS)
    for j, col in enumerate(COLUMNS):
        values = [summary["perplexity"][t].get(col) or 0 for t in texts]
        ax.bar([i + j * width for i in range(len(texts))], values, width, label=LABELS[col])
    ax.set_xticks([i + width * (len(COLUMNS) - 1) / 2 for i in range(len(texts))])
    ax.set_xticklabels([t.replace("_", "-") for t in texts])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"depth {summary['depth']['base']} -> {summary['depth']['fine-tuned']}: {summary['plan']}", fontsize=8)
    top = max(v or 0 for row in summary["perplexity"].values() for v in row.values())
    ax.set_ylim(0, 1.35 * top)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    save_figure(fig, path)
