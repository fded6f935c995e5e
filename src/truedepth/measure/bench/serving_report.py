"""The engine bench's table (text or Markdown) and plot: per model and concurrency level, the median over
repeats with its spread (min-max), and LP against the base model at the same level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEAD = [
    "model",
    "depth",
    "concurrency",
    "output tok/s",
    "x base",
    "TPOT mean ms",
    "TPOT p99 ms",
    "TTFT mean ms",
    "done/failed",
]


def spread(row: dict[str, Any], metric: str, fmt: str) -> str:
    value = row.get(metric)
    if value is None:
        return "-"
    low, high = row.get(f"{metric}_min"), row.get(f"{metric}_max")
    if row.get("repeats", 1) > 1 and low is not None and high is not None:
        return f"{value:{fmt}} ({low:{fmt}}-{high:{fmt}})"
    return f"{value:{fmt}}"


def cells(row: dict[str, Any]) -> list[str]:
    speedup = row.get("throughput_vs_base")
    return [
        row["model"],
        str(row.get("depth") or "-"),
        str(row["concurrency"]),
        spread(row, "output_tok_s", ".1f"),
        f"{speedup:.2f}" if speedup else "-",
        spread(row, "mean_tpot_ms", ".1f"),
        spread(row, "p99_tpot_ms", ".1f"),
        spread(row, "mean_ttft_ms", ".0f"),
        f"{row.get('completed', 0)}/{row.get('failed', 0)}",
    ]


def ordered(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    models = list(dict.fromkeys(r["model"] for r in summary))
    return sorted(summary, key=lambda r: (r["concurrency"], models.index(r["model"])))


def format_table(summary: list[dict[str, Any]]) -> str:
    rows = [HEAD] + [cells(r) for r in ordered(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(summary: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in ordered(summary)]
    return "\n".join(out)


def plot(summary: list[dict[str, Any]], path: str | Path, engine: str) -> Path:
    """Output tokens/s and mean TPOT against concurrency, one line per model, bars from min to max."""
    from ...utils.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = sorted((r for r in summary if r["model"] == model), key=lambda r: r["concurrency"])
        levels = [r["concurrency"] for r in rows]
        for axis, metric in ((left, "output_tok_s"), (right, "mean_tpot_ms")):
            values = [r[metric] for r in rows]
            below = [v - (r[f"{metric}_min"] if r[f"{metric}_min"] is not None else v) for v, r in zip(values, rows)]
            above = [(r[f"{metric}_max"] if r[f"{metric}_max"] is not None else v) - v for v, r in zip(values, rows)]
            axis.errorbar(levels, values, yerr=[below, above], marker="o", capsize=3, label=model)
    for axis, title in ((left, "output tokens/s"), (right, "mean time per output token (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency (requests in flight)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"{engine}: base and LP models under load (median, bars: min-max over repeats)")
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)
