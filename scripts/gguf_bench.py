"""llama.cpp speed and perplexity of the default model, base against an LP plan, as GGUF files.

    .venv/bin/python scripts/gguf_bench.py --out docs/results/gguf_cpu.json

Exports base and LP in each type (truedepth.export_gguf), then, in the same run and interleaved
(base, LP, base, LP, ...) so both see the same machine load: prompt-processing and decode
tokens/s at batch 1 by llama.cpp's own timers, median over --repeats; then llama.cpp's perplexity
on the held-out novel, on the same windows truedepth.measure.eval.perplexity uses for transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import truedepth
from truedepth.deploy.llamacpp import LlamaCppLM, open_gguf, speed
from truedepth.measure.eval.data import held_out_text
from truedepth.measure.eval.perplexity import perplexity


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="parallel=20:28")
    p.add_argument("--types", default="f32,q8_0")
    p.add_argument("--threads", default="2", help="comma-separated thread counts, each measured (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dir", default="runs/gguf", help="where the GGUF files go (kept for reuse)")
    p.add_argument("--out", default="docs/results/gguf_cpu.json")
    return p.parse_args()


def export_all(args: argparse.Namespace, types: list[str], ids: list[int]) -> tuple[dict, dict]:
    """The GGUF files, and transformers' fp32 perplexity of each model on the same windows."""
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    files, hf_ppl = {}, {}
    for plan in ("base", args.plan):
        model, tok = truedepth.load("default", plan=plan)
        hf_ppl[plan] = perplexity(model, tok, ids, tokens=args.ppl_tokens, window=args.window, progress=False)[
            "perplexity"
        ]
        for type in types:
            path = folder / f"{'base' if plan == 'base' else 'lp'}-{type}.gguf"
            if not path.exists():
                truedepth.export_gguf(model, tok, path, type=type)
            files[plan, type] = path
    return files, hf_ppl


def measure_speed(args, files, ids, threads: int) -> dict:
    runs: dict[str, list[dict]] = {f"{p}|{t}": [] for p, t in files}
    for _ in range(args.repeats):
        for (plan, type), path in files.items():  # interleaved: base and LP see the same load
            llm = open_gguf(path, n_ctx=args.prompt_tokens + args.new_tokens + 8, threads=threads, logits_all=False)
            runs[f"{plan}|{type}"].append(speed(llm, ids[: args.prompt_tokens], args.new_tokens))
            llm.close()
    metrics = ("prompt_tok_s", "decode_tok_s", "prompt_cpu_tok_s", "decode_cpu_tok_s")
    return {k: {m: statistics.median(r[m] for r in v) for m in metrics} | {"runs": v} for k, v in runs.items()}


def main() -> int:
    args = parse_args()
    types = args.types.split(",")
    _, tok = truedepth.load("default")
    ids = tok(held_out_text()[: args.ppl_tokens * 8], add_special_tokens=False).input_ids
    files, hf_ppl = export_all(args, types, ids)
    threads = [int(t) for t in args.threads.split(",")]
    speeds = {}
    for n in threads:
        load_before, t0 = os.getloadavg(), time.time()
        speeds[n] = measure_speed(args, files, ids, n) | {
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "seconds": time.time() - t0,
        }
    ppl = {}
    for (plan, type), path in files.items():
        llm = open_gguf(path, n_ctx=args.window, threads=threads[0])
        ppl[f"{plan}|{type}"] = perplexity(
            LlamaCppLM(llm), tok, ids, tokens=args.ppl_tokens, window=args.window, progress=False
        )["perplexity"]
        llm.close()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "plan": args.plan,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "ppl_tokens": args.ppl_tokens,
        "window": args.window,
        "speed_by_threads": speeds,
        "perplexity": ppl,
        "transformers_fp32_perplexity": hf_ppl,
        "file_mib": {f"{p}|{t}": path.stat().st_size / 2**20 for (p, t), path in files.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for n in threads:
        print(
            f"\n{n} thread(s), load average {speeds[n]['loadavg_before'][0]:.1f} -> {speeds[n]['loadavg_after'][0]:.1f}"
        )
        print(table(result, types, n))
    print("transformers fp32 perplexity, same windows:", hf_ppl)
    return 0


def table(r: dict, types: list[str], threads: int) -> str:
    lines = [
        "| type | model | prompt tok/s | decode tok/s | prompt tok/CPU-s | decode tok/CPU-s | perplexity | file MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for type in types:
        for plan in ("base", r["plan"]):
            k = f"{plan}|{type}"
            s = r["speed_by_threads"][threads][k]
            lines.append(
                f"| {type} | {plan} | {s['prompt_tok_s']:.0f} | {s['decode_tok_s']:.1f} | "
                f"{s['prompt_cpu_tok_s']:.0f} | {s['decode_cpu_tok_s']:.1f} | "
                f"{r['perplexity'][k]:.3f} | {r['file_mib'][k]:.0f} |"
            )
        b, lp = r["speed_by_threads"][threads][f"base|{type}"], r["speed_by_threads"][threads][f"{r['plan']}|{type}"]
        ratio = {
            m: f"{lp[m] / b[m]:.2f}x" for m in ("prompt_tok_s", "decode_tok_s", "prompt_cpu_tok_s", "decode_cpu_tok_s")
        }
        lines.append(
            f"| {type} | LP / base | {ratio['prompt_tok_s']} | {ratio['decode_tok_s']} | "
            f"{ratio['prompt_cpu_tok_s']} | {ratio['decode_cpu_tok_s']} | | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
