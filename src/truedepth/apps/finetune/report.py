"""The fine-tune's report: perplexities before and after, recovered fraction, the summary file and plots."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...utils.io import write_synced as _write_bytes
from ...utils.plotting import pyplot, save_figure
from .config import CURVE_FILE, SUMMARY_FILE, FinetuneOptions, TrainConfig
from .train import TokenBatches, TrainResult


# =============================================================================================
# Evaluation, summary, plot
# =============================================================================================
def recovered_fraction(base: float, lp: float, ft: float) -> float | None:
    """(ppl_LP - ppl_FT) / (ppl_LP - ppl_base): 1 = the whole LP gap won back, 0 = none, <0 = worse."""
    gap = lp - base
    return None if abs(gap) < 1e-12 else (lp - ft) / gap


def plot_curve(summary: dict[str, Any], path: Path) -> Path | None:
    """Training loss over tokens and (when evaluated) held-out perplexity over tokens."""
    plt = pyplot(optional=True)
    if plt is None:
        return None
    history, evals = summary["history"], summary.get("evals") or []
    ncols = 2 if evals else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    x = [h["tokens"] for h in history]
    y = [h["loss"] for h in history]
    ax.plot(x, y, lw=0.6, alpha=0.4, label="per step")
    smooth = [sum(y[max(0, i - 19) : i + 1]) / len(y[max(0, i - 19) : i + 1]) for i in range(len(y))]
    ax.plot(x, smooth, lw=1.5, label="mean of 20 steps")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("KL(teacher || student) (nats)" if summary["loss"] == "distill" else "cross-entropy (nats)")
    ax.set_title(f"{summary['loss']} loss, plan {summary['plan']}")
    ax.legend()
    if evals:
        ax = axes[0][1]
        key = summary["eval_names"][0]
        ppl = summary["perplexity"][key]
        ax.plot([e["tokens"] for e in evals], [e[key] for e in evals], "o-", label="during training (training copy)")
        ax.plot([summary["tokens"]], [ppl["ft"]], "*", ms=12, label=f"saved model {ppl['ft']:.2f}")
        if ppl["base"] is not None:
            ax.axhline(ppl["base"], color="green", ls="--", label=f"base {ppl['base']:.2f}")
        ax.axhline(ppl["lp"], color="red", ls="--", label=f"LP before FT {ppl['lp']:.2f}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"perplexity ({key})")
        ax.set_title("held-out perplexity during fine-tuning")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_recovery(summaries: list[str | Path], path: str | Path, text: str = "held_out") -> Path:
    """Recovered fraction of the perplexity gap vs training tokens for several finished runs.

    Each summary needs --eval-every points; the last point of each run is its saved model.
        python -c "from truedepth.apps.finetune.report import plot_recovery as p; p(['runs/a', 'runs/b'], 'cmp.png')"
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for item in summaries:
        item = Path(item)
        s = json.loads((item / SUMMARY_FILE if item.is_dir() else item).read_text())
        ppl = s["perplexity"][text]
        points = [
            (e["tokens"], e["recovered"])
            for e in s.get("evals", [])
            if e.get(text) is not None and e.get("recovered") is not None and text == "held_out"
        ]
        points = (points or [(0, 0.0)]) + [(s["tokens"], ppl["recovered"])]  # 0 tokens = the LP model: 0%
        label = f"{s['loss']}{' LoRA' if s['lora'] else ''} ({s['train_seconds'] / 60:.0f} min)"
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=label)
    ax.axhline(100, color="green", ls="--", lw=1, label="base model")
    ax.axhline(0, color="red", ls="--", lw=1, label="LP, no fine-tuning")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"recovered % of the {text.replace('_', '-')} perplexity gap")
    ax.set_title(f"plan {s['plan']}: (ppl_LP - ppl_FT) / (ppl_LP - ppl_base)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def summarise(
    args: FinetuneOptions,
    cfg: TrainConfig,
    plan: Any,
    result: TrainResult,
    meta: dict[str, Any],
    final: dict[str, float] | None,
    device: Any,
    dtype: torch.dtype,
    train_dtype: torch.dtype,
    data: TokenBatches,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "model": str(args.model),
        "plan": str(plan),
        "data": args.data,
        "loss": cfg.loss,
        "lora": cfg.lora,
        "config": asdict(cfg),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "train_dtype": str(train_dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "steps": result.step,
        "tokens": result.tokens,
        "finished": result.finished,
        "stopped_by": result.stopped_by,
        "epochs": round(data.epochs(result.step), 3),
        "train_seconds": round(result.train_seconds, 1),
        "tokens_per_second": round(result.tokens / max(result.train_seconds, 1e-9), 1),
        "peak_memory_bytes": _peak_memory(device),
        "date": time.strftime("%Y-%m-%d"),
        "command": "truedepth " + " ".join(sys.argv[1:]),
        "history": result.history,
        "evals": result.evals,
    }
    if final is not None and meta.get("lp"):
        names = list(final)
        base = meta.get("base") or {}
        summary["eval_names"] = names
        summary["eval_tokens"], summary["eval_window"] = args.eval_tokens, args.eval_window
        summary["perplexity"] = {
            n: {
                "base": base.get(n),
                "lp": meta["lp"][n],
                "ft": final[n],
                "recovered": _recovered(base.get(n), meta["lp"][n], final[n]),
            }
            for n in names
        }
        for e in summary["evals"]:
            e["recovered"] = _recovered(base.get("held_out"), meta["lp"]["held_out"], e["held_out"])
    return summary


def _recovered(base: float | None, lp: float, ft: float) -> float | None:
    return None if base is None else recovered_fraction(base, lp, ft)


def _peak_memory(device: Any) -> int | None:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:
        return None


def write_summary(summary: dict[str, Any], out: Path) -> None:
    tmp = out / f".{SUMMARY_FILE}.tmp"
    _write_bytes(tmp, json.dumps(summary, indent=1).encode())
    os.replace(tmp, out / SUMMARY_FILE)
    plot_curve(summary, out / CURVE_FILE)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    print(
        f"fine-tuned {summary['steps']} steps, {summary['tokens']} tokens in {summary['train_seconds']:.0f} s "
        f"({summary['tokens_per_second']:.0f} tok/s, {summary['device']}, trained in {summary['train_dtype']}, "
        f"saved in {summary['dtype']})"
        + (" -- stopped by --max-minutes" if summary["stopped_by"] == "max_minutes" else "")
    )
    for name, p in (summary.get("perplexity") or {}).items():
        rec = "n/a" if p["recovered"] is None else f"{100 * p['recovered']:.1f}%"
        base = "n/a" if p["base"] is None else f"{p['base']:.3f}"
        print(f"  {name:13s} perplexity  base {base}   LP {p['lp']:.3f}   fine-tuned {p['ft']:.3f}   recovered {rec}")
    print(f"saved to {out} (load with truedepth.load('{out}')); summary {out / SUMMARY_FILE}, plot {out / CURVE_FILE}")
