"""llama.cpp's own programs on the default model, base against LP: KV-cache memory with and without
flash attention, llama-bench speed, and perplexity under quantization (issue 28).

    .venv/bin/python scripts/gguf_programs_bench.py --out docs/results/gguf_programs_cpu.json

Needs the programs (`make llama-programs`). Exports each model once as f32 (truedepth.export_gguf) and
quantizes it with llama-quantize (q8_0, q4_k_m, q4_0), into --dir (kept for reuse). Models: base,
`parallel=20:28`, and the depth-24 plan `truedepth compress` searched (docs/results/compress_d24.json;
the plan alone: its fine-tuned weights are not on this machine). Every measurement takes turns over
the models (base, LP, d24, then the next round in another order) so that all of them see the same
machine load; the load average is recorded with each one. Sections:

- kv: llama-completion loads each model (q8_0) at -c 2048 with -fa off and on, and prints its KV
  cache (llama.cpp's own numbers, at -lv 4) and its prompt and decode speed; llama-bench measures
  decode at depth 0 and 1024 with -fa 0 and 1. One thread: on a shared machine llama.cpp's
  spin-waiting threads make 2-thread timings swing by 10x.
- bench1, bench2: llama-bench pp64 / tg16 for every model and type with 1 thread, and for base and
  LP in f32, q8_0, q4_k_m with 2 threads (measured last: on a shared machine 2 spin-waiting threads
  take minutes per call), --rounds calls of one repetition each, so the spread is over rounds
  taken in turn.
- ppl: llama-perplexity on the held-out novel and the other-domain text with --ppl-stride = window - 1
  (each window scores every token but its first: truedepth eval's windows with --stride window-1;
  -c window - stride // 2, as the strided mode widens the context by stride // 2, rounded up to 256),
  llama.cpp's default f16 KV cache, for every model and type.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUANT = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="base,lp,d24", help="of base, lp (parallel=20:28), d24 (compress_d24.json)")
    p.add_argument("--types", default="f32,q8_0,q4_k_m,q4_0")
    p.add_argument("--sections", default="kv,bench1,ppl,bench2", help="bench1/bench2: llama-bench, 1/2 threads")
    p.add_argument("--rounds", type=int, default=3, help="llama-bench rounds (one repetition each)")
    p.add_argument("--prompt", type=int, default=64, help="llama-bench prompt tokens (pp)")
    p.add_argument("--gen", type=int, default=16, help="llama-bench generated tokens (tg)")
    p.add_argument("--models2", default="base,lp", help="models measured with 2 threads too (section bench2)")
    p.add_argument("--types2", default="f32,q8_0,q4_k_m", help="types measured with 2 threads too")
    p.add_argument("--ppl-windows", type=int, default=4, help="perplexity windows per text")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dir", default="runs/gguf-programs")
    p.add_argument("--out", default="docs/results/gguf_programs_cpu.json")
    return p.parse_args()


def plans() -> dict[str, str]:
    d24 = json.loads((ROOT / "docs/results/compress_d24.json").read_text())["plan"]
    return {"base": "base", "lp": "parallel=20:28", "d24": d24}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run(argv, timeout: float = 1800, complete: str | None = None) -> tuple[str, float]:
    """Output and seconds of one run; with `complete`, repeated until that line is in the output
    (llama.cpp's log thread is not flushed at exit: see tests/test_llamacpp_programs.py)."""
    for _ in range(3):
        start = time.perf_counter()
        result = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"{argv[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        out = result.stdout + "\n" + result.stderr
        if complete is None or complete in out:
            return out, seconds
    sys.exit(f"{argv[0]}: output incomplete in 3 runs")


def turns(models: list[str], round_: int) -> list[str]:
    """The models in the order of this round: rotated, so none always runs first."""
    k = round_ % len(models)
    return models[k:] + models[:k]


def export_files(models, types, folder: Path, record: dict) -> dict[tuple[str, str], Path]:
    from truedepth.deploy.llamacpp import find_program

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[tuple[str, str], Path] = {}
    default = None
    for name in models:
        f32 = folder / f"{name}-f32.gguf"
        if not f32.exists():
            import copy

            import truedepth
            from truedepth.deploy.gguf import export_gguf

            default = default or truedepth.load("default")
            model, tok = default
            plan = plans()[name]
            lp = model if plan == "base" else truedepth.apply_plan(copy.deepcopy(model), plan)
            export_gguf(lp, tok, f32)
        files[name, "f32"] = f32
        for t in types:
            if t == "f32":
                continue
            path = folder / f"{name}-{t}.gguf"
            if not path.exists():
                _, seconds = run([find_program("llama-quantize"), f32, path, QUANT[t], 2])
                record.setdefault("quantize_seconds", {})[f"{name}-{t}"] = round(seconds, 1)
            files[name, t] = path
    record["files"] = {f"{m}-{t}": {"path": str(p), "bytes": p.stat().st_size} for (m, t), p in files.items()}
    return files


KV_SIZE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers.*?K \((\w+)\):\s*([\d.]+) MiB, "
    r"V \((\w+)\):\s*([\d.]+) MiB"
)
PERF = re.compile(r"(prompt eval|\s eval) time =\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs).*?([\d.]+) tokens per second")


def kv_section(models, files, args, record: dict) -> None:
    from truedepth.deploy.llamacpp import find_program

    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    rows = []
    for round_ in range(2):
        for fa in ("off", "on"):
            for name in turns(models, round_):
                before = load()
                out, seconds = run(
                    [find_program("llama-completion"), "-m", files[name, "q8_0"], "-c", 2048, "-fa", fa,
                     "-p", prompt, "-n", 64, "--ignore-eos", "--temp", 0, "-no-cnv", "-t", 1, "--no-warmup", "-lv", 4],
                    complete="total time =",
                )  # fmt: skip
                kv = KV_SIZE.search(out)
                perf = {m.group(1).strip(): float(m.group(4)) for m in PERF.finditer(out)}
                rows.append({
                    "model": name, "type": "q8_0", "ctx": 2048, "flash_attn": fa, "round": round_,
                    "kv_mib": float(kv.group(1)), "kv_cells": int(kv.group(2)), "kv_layers": int(kv.group(3)),
                    "k_type": kv.group(4), "k_mib": float(kv.group(5)), "v_type": kv.group(6),
                    "v_mib": float(kv.group(7)), "v_padded": "padding V cache" in out,
                    "prompt_tok_s": perf.get("prompt eval"), "decode_tok_s": perf.get("eval"),
                    "seconds": round(seconds, 1), "load_before": before, "load_after": load(),
                })  # fmt: skip
                print(rows[-1], flush=True)
    record["kv"] = rows
    bench = []
    for round_ in range(min(args.rounds, 3)):
        order = turns(models, round_)
        argv = [find_program("llama-bench")]
        for name in order:
            argv += ["-m", files[name, "q8_0"]]
        argv += ["-fa", "0,1", "-p", 0, "-n", 32, "-d", "0,1024", "-t", 1, "-r", 1, "-o", "json"]
        before = load()
        out, _ = run(argv)
        for entry in bench_json(out):
            entry.update(round=round_, load_before=before, load_after=load())
            bench.append(entry)
        print(f"kv bench round {round_} done, load {before} -> {load()}", flush=True)
    record["kv_bench"] = bench


def bench_json(out: str) -> list[dict]:
    start, end = out.index("["), out.rindex("]") + 1
    keep = ("model_filename", "model_size", "n_threads", "n_prompt", "n_gen", "n_depth", "flash_attn", "avg_ts")
    return [{k: e[k] for k in keep if k in e} for e in json.loads(out[start:end])]


def bench_section(models, types, files, threads: int, args, record: dict) -> None:
    from truedepth.deploy.llamacpp import find_program

    rows = record.setdefault("bench", [])
    for round_ in range(args.rounds):
        for t in types:
            argv = [find_program("llama-bench")]
            for name in turns(models, round_):
                argv += ["-m", files[name, t]]
            argv += ["-p", args.prompt, "-n", args.gen, "-t", threads, "-r", 1, "-o", "json"]
            before = load()
            out, _ = run(argv)
            for entry in bench_json(out):
                entry.update(round=round_, type=t, load_before=before, load_after=load())
                rows.append(entry)
        print(f"bench round {round_} threads {threads} done, load {load()}", flush=True)
        save(record, args.out)


def text_file(kind: str, tokens: int, folder: Path) -> Path:
    """The first `tokens` tokens of the text (and a little more: llama.cpp counts the windows)."""
    from transformers import AutoTokenizer

    from truedepth.core.loading import default_model_dir
    from truedepth.measure.eval.data import held_out_text, other_domain_text

    text = held_out_text() if kind == "held_out" else other_domain_text()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    chars = tokens * 5
    while len(tok(text[:chars], add_special_tokens=False).input_ids) < tokens:
        chars = int(chars * 1.2)
    path = folder / f"{kind}.txt"
    path.write_text(text[:chars])
    return path


def ppl_section(models, types, files, args, record: dict) -> None:
    from truedepth.deploy.llamacpp import find_program

    window, stride = args.window, args.window - 1
    ctx = window - stride // 2  # -b too: else it runs batch // ctx sequences side by side
    need = window + (args.ppl_windows - 1) * stride + 1
    rows = record.setdefault("perplexity", [])
    for kind in ("held_out", "other_domain"):
        path = text_file(kind, need, Path(args.dir))
        for i, t in enumerate(types):
            for name in turns(models, i):
                before = load()
                out, seconds = run(
                    [find_program("llama-perplexity"), "-m", files[name, t], "-f", path, "-c", ctx, "-b", ctx,
                     "--ppl-stride", stride, "--chunks", args.ppl_windows, "-t", 1],
                    complete=f"[{args.ppl_windows}]",  # the value after the last window
                )  # fmt: skip
                chunk = int(re.search(r"Calculation chunk = (\d+)", out).group(1))
                assert chunk == window, f"llama-perplexity used windows of {chunk}, not {window}"
                running = re.findall(r"\[(\d+)\](\d+\.\d+),", out)
                rows.append({
                    "text": kind, "model": name, "type": t, "perplexity": float(running[-1][1]),
                    "windows": int(running[-1][0]), "window": window, "stride": stride,
                    "scored_tokens": int(running[-1][0]) * stride, "seconds": round(seconds, 1),
                    "load_before": before, "load_after": load(),
                })  # fmt: skip
                print(rows[-1], flush=True)
        save(record, args.out)


def save(record: dict, out: str) -> None:
    from truedepth.utils.io import atomic_write_json

    atomic_write_json(out, record, indent=1)


def summary(record: dict) -> str:
    """Markdown tables of the medians and spreads."""
    lines = []
    sizes = {k: v["bytes"] / 2**20 for k, v in record.get("files", {}).items()}
    name_of = {Path(v["path"]).name: k for k, v in record.get("files", {}).items()}
    if record.get("kv"):
        lines += [
            "| model | -fa | KV MiB (K + V) | V padded | prompt tok/s | decode tok/s |",
            "|---|---|---|---|---|---|",
        ]
        groups: dict = {}
        for r in record["kv"]:
            groups.setdefault((r["model"], r["flash_attn"]), []).append(r)
        for (m, fa), rs in groups.items():
            r = rs[0]
            pp = statistics.median(x["prompt_tok_s"] for x in rs)
            tg = statistics.median(x["decode_tok_s"] for x in rs)
            lines.append(
                f"| {m} | {fa} | {r['kv_mib']:.1f} ({r['k_mib']:.1f} + {r['v_mib']:.1f}) | {r['v_padded']} | "
                f"{pp:.0f} | {tg:.1f} |"
            )
    for key, title in (("kv_bench", "depth / fa"), ("bench", "threads")):
        if not record.get(key):
            continue
        groups = {}
        for e in record[key]:
            model = name_of.get(Path(e["model_filename"]).name, e["model_filename"])
            test = f"pp{e['n_prompt']}" if e["n_prompt"] else f"tg{e['n_gen']}"
            extra = f"d{e['n_depth']} fa{int(e['flash_attn'])}" if key == "kv_bench" else f"t{e['n_threads']}"
            groups.setdefault((model, extra, test), []).append(e["avg_ts"])
        lines += ["", f"| model | {title} | test | median tok/s | min–max | n |", "|---|---|---|---|---|---|"]
        for (model, extra, test), v in sorted(groups.items()):
            lines.append(
                f"| {model} | {extra} | {test} | {statistics.median(v):.1f} | {min(v):.1f}–{max(v):.1f} | {len(v)} |"
            )
    if record.get("perplexity"):
        lines += ["", "| text | model | type | perplexity | MiB |", "|---|---|---|---|---|"]
        for r in record["perplexity"]:
            lines.append(
                f"| {r['text']} | {r['model']} | {r['type']} | {r['perplexity']:.3f} | "
                f"{sizes.get(r['model'] + '-' + r['type'], math.nan):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    from truedepth.utils.env import cpu_name

    models, types = args.models.split(","), args.types.split(",")
    sections = args.sections.split(",")
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    runs = record.setdefault("runs", [])  # sections measured by separate invocations add up in one file
    runs.append({"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z")})
    record.update({
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "plans": {m: plans()[m] for m in models},
        "d24_weights": "plan only (the fine-tuned depth-24 model is not on this machine)",
    })  # fmt: skip
    files = export_files(models, types, Path(args.dir), record)
    save(record, args.out)
    if "kv" in sections:
        kv_section(models, files, args, record)
        save(record, args.out)
    if "bench1" in sections:
        bench_section(models, types, files, 1, args, record)
    if "ppl" in sections:
        ppl_section(models, types, files, args, record)
    if "bench2" in sections:
        bench_section(args.models2.split(","), args.types2.split(","), files, 2, args, record)
    save(record, args.out)
    print(summary(record))


if __name__ == "__main__":
    main()
