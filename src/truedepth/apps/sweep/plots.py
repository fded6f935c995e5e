"""The sweep's plots: quality against Δ, start position, depth (Pareto) and Δ/L, with the paper's claims."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...utils.plotting import pyplot, save_figure
from .points import TRANSFORMS
from .tables import _at_chance, anchored, metric_columns

COLORS = {"parallel": "tab:blue", "skip": "tab:red", "shuffle": "tab:green", "merge": "tab:purple", "base": "black"}


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _plt():
    return pyplot()


PPL_CAP = 30.0  # perplexity axes stop at 30x the base model's: beyond, the model is broken anyway


def _axes(plt, n: int):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _label(metric: str) -> str:
    return "perplexity (log scale)" if metric == "perplexity" else f"{metric} (accuracy)"


def _base_value(rows, metric) -> float | None:
    return next((r[metric] for r in rows if r["transform"] == "base" and r.get(metric) is not None), None)


def _base_line(ax, rows, metric) -> None:
    from ...measure.eval.icl import chance_level

    base = _base_value(rows, metric)
    if base is not None:
        ax.axhline(base, color="black", ls=":", lw=1, label="base")
    level = chance_level(metric.split("@")[0]) if metric != "perplexity" else None
    if level is not None:
        ax.axhline(level, color="gray", ls="--", lw=1, label="chance")


def _cap(rows, metric) -> float | None:
    base = _base_value(rows, metric)
    return base * PPL_CAP if metric == "perplexity" and base else None


def _draw(ax, xs, ys, cap, style, **kw) -> None:
    """Line/markers with values above `cap` drawn at the cap as ▲ (off scale)."""
    ys = list(ys)
    shown = [min(y, cap) if cap else y for y in ys]
    if style == "scatter":
        ax.scatter(xs, shown, **kw)
    else:
        ax.plot(xs, shown, style, **kw)
    over = [(x, cap) for x, y in zip(xs, ys) if cap and y > cap]
    if over:
        ax.scatter(*zip(*over), marker="^", s=50, color=kw.get("color"), zorder=4)
        ax.truedepth_off_scale = True  # read by _finish: explain the ▲ only where there is one


def _finish(fig, ax_list, metrics, path: Path, title: str, rows=()) -> Path:
    for ax, metric in zip(ax_list, metrics):
        cap = _cap(rows, metric)
        if metric == "perplexity":
            ax.set_yscale("log")
            if cap and getattr(ax, "truedepth_off_scale", False):
                ax.set_ylim(top=cap * 1.3)
                ax.text(
                    0.99,
                    0.98,
                    f"▲ off scale (> {cap:.0f})",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=7,
                    color="gray",
                )
        else:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _with_data(rows, metrics, pts) -> list[str]:
    """Metrics that have at least one measured point besides the base model."""
    return [m for m in metrics if any(r.get(m) is not None and r["transform"] != "base" for r in pts)]


def _panels(rows: Sequence[dict[str, Any]], pts: Sequence[dict[str, Any]]):
    """(plt, fig, axes, metrics): one panel per metric with data, or None when there is nothing to draw."""
    metrics = _with_data(rows, metric_columns(rows), pts)
    if not pts or not metrics:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    return plt, fig, axes, metrics


def plot_delta(rows: Sequence[dict[str, Any]], path: Path, rule: str = "end", title: str = "") -> Path | None:
    """Metric against Δ for each transform, ranges at the default position (the paper's figure)."""
    pts = [r for r in rows if anchored(r, rule)]
    panels = _panels(rows, pts)
    if panels is None:
        return None
    plt, fig, axes, metrics = panels
    for ax, metric in zip(axes, metrics):
        cap = _cap(rows, metric)
        for transform in TRANSFORMS:
            xs = sorted(
                (r["delta"], r[metric]) for r in pts if r["transform"] == transform and r.get(metric) is not None
            )
            if xs:
                _draw(ax, [x for x, _ in xs], [y for _, y in xs], cap, "o-", color=COLORS[transform], label=transform)
        _base_line(ax, rows, metric)
        ax.set_xlabel("Δ = layers transformed" + (" (range ends at L-2)" if rule == "end" else " (centred)"))
    return _finish(fig, axes, metrics, path, title or "Quality against Δ", rows)


def plot_start(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Metric against start position, one line per (transform, Δ) with at least 3 starts."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["transform"] != "base":
            groups.setdefault((r["transform"], r["delta"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["start"] for r in v}) >= 3}
    metrics = [
        m for m in metric_columns(rows) if any(sum(r.get(m) is not None for r in v) >= 3 for v in groups.values())
    ]
    if not groups or not metrics:
        return None
    plt = _plt()
    fig, axes = _axes(plt, len(metrics))
    styles = ["o-", "s--", "^-.", "d:"]
    for ax, metric in zip(axes, metrics):
        cap = _cap(rows, metric)
        for i, ((transform, delta), rs) in enumerate(sorted(groups.items())):
            xs = sorted((r["start"], r[metric]) for r in rs if r.get(metric) is not None)
            if len(xs) >= 2:
                _draw(
                    ax,
                    [x for x, _ in xs],
                    [y for _, y in xs],
                    cap,
                    styles[i % len(styles)],
                    ms=4,
                    color=COLORS[transform],
                    label=f"{transform} Δ={delta}",
                )
        _base_line(ax, rows, metric)
        ax.set_xlabel("start layer of the range (first transformed layer)")
    return _finish(fig, axes, metrics, path, title or "Quality against position at fixed Δ", rows)


def pareto_front(points: Sequence[tuple[float, float]], lower_x_better: bool, lower_y_better: bool):
    """Points not dominated by another (better or equal in both, better in one)."""
    sx = 1 if lower_x_better else -1
    sy = 1 if lower_y_better else -1
    front = []
    for x, y in sorted(points, key=lambda p: (sx * p[0], sy * p[1])):
        if not front or sy * y < sy * front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(
    rows: Sequence[dict[str, Any]], path: Path, bench: dict[str, float] | None = None, title: str = ""
) -> Path | None:
    """Metric against depth (or decode ms/token from a bench JSON), all plans, with the Pareto front."""

    def xval(r):
        return bench.get(r["plan"]) if bench is not None else r["depth"]

    pts = [r for r in rows if xval(r) is not None]
    panels = _panels(rows, pts)
    if panels is None:
        return None
    plt, fig, axes, metrics = panels
    for ax, metric in zip(axes, metrics):
        lower_better = metric == "perplexity"
        cap = _cap(rows, metric)
        for transform in ("base",) + TRANSFORMS:
            xs = [(xval(r), r[metric]) for r in pts if r["transform"] == transform and r.get(metric) is not None]
            if xs:
                _draw(
                    ax,
                    [x for x, _ in xs],
                    [y for _, y in xs],
                    cap,
                    "scatter",
                    color=COLORS[transform],
                    label=transform,
                    s=22 if transform != "base" else 80,
                    marker="o" if transform != "base" else "*",
                    zorder=3,
                )
        allpts = [(xval(r), r[metric]) for r in pts if r.get(metric) is not None]
        front = [
            (x, min(y, cap) if cap else y)
            for x, y in pareto_front(allpts, lower_x_better=True, lower_y_better=lower_better)
        ]
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="gray", lw=1, alpha=0.7, label="Pareto front")
        _base_line(ax, rows, metric)
        ax.set_xlabel("decode ms per token (from bench)" if bench is not None else "depth (sequential layers)")
    return _finish(
        fig, axes, metrics, path, title or ("Quality against decode time" if bench else "Quality against depth"), rows
    )


# Paper: Llama 2 7B (32 layers) keeps 95-99 % up to Δ=14, Llama 3.2 3B (28 layers) up to Δ=10.
PAPER_CLAIMS = (("Llama 2 7B", 14, 32), ("Llama 3.2 3B", 10, 28))


def plot_relative(rows: Sequence[dict[str, Any]], path: Path, rule: str = "end", title: str = "") -> Path | None:
    """Fraction of the base model's quality kept against the fraction of layers transformed (Δ/L),
    with the paper's claims (95-99 % kept up to Δ=14 of 32 and Δ=10 of 28) marked."""
    metrics = [m for m in metric_columns(rows) if m == "perplexity" or not _at_chance(rows, m)]
    pts = [r for r in rows if anchored(r, rule)]
    if not pts or not metrics:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ["o-", "s--", "^-.", "d:"]
    for transform in ("parallel", "skip"):
        for i, metric in enumerate(metrics):
            xs = sorted(
                (r["delta"] / r["num_layers"], r[f"{metric}_rel"])
                for r in pts
                if r["transform"] == transform and r.get(f"{metric}_rel") is not None
            )
            if len(xs) >= 2:
                ax.plot(
                    *zip(*xs),
                    styles[i % len(styles)],
                    color=COLORS[transform],
                    ms=4,
                    label=f"{transform}: {'base ppl / ppl' if metric == 'perplexity' else metric + ' / base'}",
                )
    ax.axhspan(0.95, 0.99, color="gold", alpha=0.25, label="paper: 95-99 % kept")
    for (name, delta, layers), ls in zip(PAPER_CLAIMS, ("--", ":")):
        ax.axvline(delta / layers, color="gray", ls=ls, lw=1, label=f"paper: {name}, Δ={delta} of {layers}")
    ax.set_xlabel("Δ / L  (fraction of layers transformed)")
    ax.set_ylabel("fraction of base quality kept")
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "Quality kept against the fraction of layers transformed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def make_plots(
    folder: Path,
    rows: Sequence[dict[str, Any]],
    rule: str = "end",
    bench: dict[str, float] | None = None,
    model: str = "",
    prefix: str = "",
) -> list[Path]:
    made = [
        plot_delta(rows, folder / f"{prefix}delta.png", rule, f"{model}: quality against Δ"),
        plot_start(rows, folder / f"{prefix}start.png", f"{model}: quality against position"),
        plot_pareto(
            rows,
            folder / f"{prefix}pareto.png",
            bench,
            f"{model}: quality against " + ("decode time" if bench else "depth"),
        ),
        plot_relative(rows, folder / f"{prefix}relative.png", rule, f"{model}: quality kept against Δ/L"),
    ]
    return [p for p in made if p is not None]
