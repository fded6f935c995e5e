"""The benchmark's report: aligned and Markdown tables, the plot, and the JSON file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...utils.errors import MeasurementError
from ...utils.io import atomic_write_json
from ...utils.plotting import pyplot, save_figure
from .decode import MODES


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def step_gb(r: dict[str, Any]) -> float | None:
    """GB one decode step must read: weights + the KV cache at the mean context length."""
    if "weight_bytes" not in r or "kv_bytes_per_token" not in r:
        return None
    context = r.get("prompt", 0) + (r.get("new", 1) - 1) / 2
    return (r["weight_bytes"] + r["kv_bytes_per_token"] * r.get("batch", 1) * context) / 1e9


def format_table(records: list[dict[str, Any]]) -> str:
    lengths = sorted({int(k) for r in records for k in r.get("prefill_ms", {})})
    head = [
        "model",
        "plan",
        "depth",
        "mode",
        "batch",
        *[f"prefill {n} ms" for n in lengths],
        "tok/s/seq",
        "tok/s total",
        "x base",
        "x HF comp.",
        "GB/step",
        "% bound",
    ]
    rows = [head]
    for r in records:
        if "error" in r:
            rows.append(
                [
                    r["model"],
                    r["plan"],
                    str(r.get("depth", "-")),
                    r["mode"],
                    str(r["batch"]),
                    *[""] * len(lengths),
                    "error: " + r["error"][:60],
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        rows.append(measured_cells(r, lengths))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def measured_cells(r: dict[str, Any], lengths: list[int]) -> list[str]:
    """One measured record's cells, in the column order of the text and Markdown tables."""
    pre = r.get("prefill_ms", {})
    return [
        r["model"],
        r["plan"],
        str(r.get("depth", "-")),
        r["mode"],
        str(r["batch"]),
        *[_fmt(pre.get(str(n)), ".1f") for n in lengths],
        _fmt(r["decode_tok_s"], ".1f"),
        _fmt(r.get("decode_tok_s_total"), ".1f"),
        _fmt(r.get("speedup_vs_base"), ".2f"),
        _fmt(r.get("speedup_vs_base_compiled"), ".2f"),
        _fmt(step_gb(r), ".2f"),
        _fmt(100 * r["bound_fraction"] if r.get("bound_fraction") else None, ".0f"),
    ]


def format_markdown(records: list[dict[str, Any]]) -> str:
    """The same table as GitHub markdown (for docs/BENCHMARKS.md)."""
    lengths = sorted({int(k) for r in records for k in r.get("prefill_ms", {})})
    head = [
        "model",
        "plan",
        "depth",
        "mode",
        "batch",
        *[f"prefill {n} (ms)" for n in lengths],
        "decode tok/s/seq",
        "tok/s total",
        "x base (same mode)",
        "x base HF compiled",
        "GB read/step",
        "% of bandwidth bound",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r:
            out.append(
                f"| {r['model']} | {r['plan']} | {r.get('depth', '-')} | {r['mode']} | {r['batch']} | "
                + " | ".join([""] * len(lengths))
                + f" | failed: {r['error'][:80]} | | | | | |"
            )
            continue
        out.append("| " + " | ".join(measured_cells(r, lengths)) + " |")
    return "\n".join(out)


def plot(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Total decode tokens/s against batch size (one panel per mode, one line per plan);
    with a single batch size, grouped bars per mode instead."""
    plt = pyplot()
    ok = [r for r in records if "decode_tok_s" in r]
    if not ok:
        raise MeasurementError("no successful measurement to plot.")
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    labels = list(dict.fromkeys(f"{r['model']} {r['plan']}" for r in ok))
    batches = sorted({r["batch"] for r in ok})
    value = {(f"{r['model']} {r['plan']}", r["mode"], r["batch"]): r["decode_tok_s_total"] for r in ok}
    if len(batches) == 1:
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(modes) * max(1, len(labels)) / 2, 4))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs = [j + i * width for j, _ in enumerate(modes)]
            ys = [value.get((label, m, batches[0]), 0) for m in modes]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(modes))], modes)
        ax.set_ylabel(f"decode tokens/s (batch {batches[0]})")
        ax.set_ylim(bottom=0)
    else:
        fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.8), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for label in labels:
                pts = [(b, value[(label, mode, b)]) for b in batches if (label, mode, b) in value]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_title(mode)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("batch size")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("decode tokens/s, all sequences")
        ax = axes[0][-1]
    ax.legend(fontsize=8)
    fig.suptitle("truedepth bench: base vs LP plans", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)
    return path


def write_json(path: str | os.PathLike, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    atomic_write_json(path, {"meta": meta, "records": records})  # a reader never sees half a file
