"""The search's report: held-out perplexity of the final plans, the summary table and the plot."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ...core.plan import Plan
from ...utils.plotting import pyplot, save_figure


# ---------------------------------------------------------------------------------------------
# Reporting: held-out perplexity from the real fused model, plot
# ---------------------------------------------------------------------------------------------
def held_out_perplexity(model: Any, tokenizer: Any, plan: Plan, text: str, tokens: int, window: int) -> float:
    """Perplexity of `plan` applied for real (apply_plan on a copy) on `text`."""
    from ...core.transform import apply_plan
    from ...measure.eval.perplexity import perplexity

    candidate = copy.deepcopy(model)
    try:
        if not plan.is_identity:
            apply_plan(candidate, plan)
        return perplexity(candidate, tokenizer, text, tokens=tokens, window=window, progress=False)["perplexity"]
    finally:
        del candidate


def report_held_out(
    model: Any, tokenizer: Any, rows: list[dict], text: str, tokens: int, window: int, progress: bool = True
) -> None:
    """Add 'heldout_ppl' to every row ({'plan': plan dict, ...}) in place."""
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="held-out perplexity", unit="plan", disable=not progress, leave=False):
        row["heldout_ppl"] = held_out_perplexity(model, tokenizer, Plan.from_dict(row["plan"]), text, tokens, window)


def plot(summary: dict, path: str | Path) -> None:
    """Objective against depth for the found plans and the contiguous baseline (and held-out
    perplexity, when reported)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    found = summary["found"]
    base = summary.get("baseline") or []
    held = any("heldout_ppl" in f for f in found)
    fig, axes = plt.subplots(1, 2 if held else 1, figsize=(11 if held else 6, 4.2), squeeze=False)
    panels = [("objective", f"calibration {summary['objective']}")] + (
        [("heldout_ppl", "held-out perplexity")] if held else []
    )
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot([f["depth"] for f in found], [f[key] for f in found], "o-", label="searched plans")
        if base:
            ax.plot([b["depth"] for b in base], [b[key] for b in base], "s--", label="best contiguous range of pairs")
        ref = summary.get("base_heldout_ppl") if key == "heldout_ppl" else summary["base_objective"]
        if ref is not None:
            ax.axhline(ref, color="gray", lw=0.8, ls=":", label=f"original model ({summary['num_layers']} layers)")
        ax.set_xlabel("depth (layers run one after another)")
        ax.set_ylabel(title)
        ax.invert_xaxis()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"truedepth search: {summary.get('model', '')}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)


def print_summary(summary: dict) -> None:
    base = {b["depth"]: b for b in summary.get("baseline", [])}
    obj = summary["objective"]

    def num(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if row.get(key) is not None else "-"

    print(f"\n{'depth':>5}  {obj:>9}  {'fresh':>9}  {'held-out':>8}  {'passes':>6}  plan")
    for f in summary["found"]:
        print(
            f"{f['depth']:>5}  {f['objective']:>9.4f}  {num(f, 'selection_objective', '9.4f'):>9}  "
            f"{num(f, 'heldout_ppl', '.3f'):>8}  {f['forward_passes']:>6}  {f['plan']['plan']}"
        )
        b = base.get(f["depth"])
        if b:
            print(
                f"{'':>5}  {b['objective']:>9.4f}  {num(b, 'selection_objective', '9.4f'):>9}  "
                f"{num(b, 'heldout_ppl', '.3f'):>8}  {b['forward_passes']:>6}  {b['plan']['plan']}"
                "  (best contiguous range)"
            )
    if "base_heldout_ppl" in summary:
        print(f"original model: {obj} {summary['base_objective']:.4f}, held-out ppl {summary['base_heldout_ppl']:.3f}")
    print(
        f"search: {summary['forward_passes']} forward passes over the calibration batch "
        f"({summary['layer_runs'] / summary['num_layers']:.1f} full-model equivalents of decoder layers), "
        f"{summary['search_seconds']:.1f} s"
        + (
            f"; final choice on fresh windows {summary['selection_seconds']:.1f} s"
            if "selection_seconds" in summary
            else ""
        )
    )
    if len(summary["found"]) == 1:
        print("plan:", summary["found"][0]["plan"]["plan"])
        print("json:", json.dumps(summary["found"][0]["plan"]))
