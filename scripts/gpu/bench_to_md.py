"""Render scripts/gpu/bench.py's JSON as the markdown tables of docs/BENCHMARKS.md.

python scripts/gpu/bench_to_md.py DIR/bench_gpu.json > gpu_tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from truedepth.measure.bench.report import format_markdown  # noqa: E402


def _x(v, spec=".2f", pct=False):
    if v is None:
        return "-"
    return format(100 * v, ".0f") + "%" if pct else format(v, spec)


def render(doc: dict) -> str:
    meta = doc.get("meta", {})
    bw = meta.get("bandwidth_GBps")
    lines = [
        f"Measured {meta.get('date', '?')} on {meta.get('device_name', '?')} ({meta.get('dtype', '?')}), torch "
        f"{meta.get('torch', '?')}, transformers {meta.get('transformers', '?')}; device copy bandwidth "
        f"{_x(bw, '.0f')} GB/s (read + write, measured in the same run); command: `PYTHONPATH=src python "
        f"scripts/gpu/bench.py {' '.join(meta.get('argv', []))}` ({_x(meta.get('elapsed_s'), '.0f')} s).",
        "",
        "### Decode and prefill",
        "",
        format_markdown(doc.get("records", [])),
    ]
    targets = doc.get("targets", [])
    if targets:
        lines += [
            "",
            "### Targets (issue 3, section 3; batch 1 unless noted)",
            "",
            "| shape | plan | loop | LP tok/s | base HF compiled tok/s | LP x base HF compiled (target) | "
            "base same loop tok/s | LP x base same loop | LP % of bound (target) | prefill x base | "
            "LP x base, same loop, larger batches |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in targets:
            pre = ", ".join(f"{k}: {v:.2f}" for k, v in t.get("prefill_speedup", {}).items()) or "-"
            big = ", ".join(f"b{k}: {v:.2f}" for k, v in t.get("x_same_loop_by_batch", {}).items()) or "-"
            lines.append(
                f"| {t['shape']} | {t['plan']} | {t['loop']} | {_x(t['lp_tok_s'], '.1f')} | "
                f"{_x(t['base_hf_compiled_tok_s'], '.1f')} | {_x(t['x_vs_base_hf_compiled'])} ({t['target_x']}) "
                f"{'met' if t['meets_x'] else 'missed'} | {_x(t['base_same_loop_tok_s'], '.1f')} | "
                f"{_x(t['x_vs_base_same_loop'])} | {_x(t['bound_fraction'], pct=True)} "
                f"({100 * t['target_bound']:.0f}%) {'met' if t['meets_bound'] else 'missed'} | {pre} | {big} |"
            )
    profiles = doc.get("profiles", [])
    if profiles:
        lines += [
            "",
            "### Where a decode step goes (torch.profiler, 16 steps, batch 1)",
            "",
            "| shape | plan | loop | kernels/step | step (us) | host time/step (us) | device busy (us) | "
            "device idle | slowest kernels (share of device time) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in profiles:
            top = "; ".join(f"`{k['name'][:60]}` {100 * k['share']:.0f}%" for k in p.get("top_kernels", [])[:4])
            lines.append(
                f"| {p['model']} | {p['plan']} | {p['mode']} | {p['kernels_per_step']:.0f} | "
                f"{p.get('step_us_unprofiled', p['step_us']):.0f} | {_x(p.get('host_us_per_step'), '.0f')} | "
                f"{p['device_busy_us_per_step']:.0f} | "
                f"{_x(p.get('idle_fraction'), pct=True)} | {top} |"
            )
    if doc.get("skipped"):
        lines += ["", "Skipped for time: " + "; ".join(doc["skipped"])]
    if doc.get("errors"):
        lines += ["", "Errors: " + "; ".join(e[:200] for e in doc["errors"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(sys.argv[1])
    if path.is_dir():
        path = path / "bench_gpu.json"
    if not path.exists():
        print(
            f"bench_to_md: {path} does not exist; pass the bench_gpu.json that scripts/gpu/bench.py wrote.",
            file=sys.stderr,
        )
        return 2
    print(render(json.loads(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
