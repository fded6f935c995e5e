"""vLLM's own latency benchmark (`vllm bench latency`), base against LP, in one run on this CPU.

    .venv/bin/python scripts/vllm_bench_cpu.py [--iters 3] [--out docs/results/vllm_bench_cpu.json]

Cases (docs/SERVING.md):
- the offline default model (real weights) against its `parallel=20:28` copy, tensor-parallel size 1;
- the Qwen2.5-0.5B shape (random weights: vLLM's `--load-format dummy`) against `parallel=12:22`
  (the plan of docs/MULTI_GPU.md), tensor-parallel size 2, one core per rank.
Batch 1 and 8; 32 prompt tokens, 32 generated; eager mode (a compile costs minutes per start on
this CPU). Base and LP alternate, so both see the same load; the load average is recorded with
each number, because the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import truedepth
from truedepth.core.loading import default_model_dir
from truedepth.core.shapes import shape_config
from truedepth.deploy.vllm import save_config_folder

VLLM = str(Path(sys.executable).with_name("vllm"))
INPUT_LEN = OUTPUT_LEN = 32


def cases(work: Path) -> list[dict]:
    lp_default = work / "default-lp"
    model, tokenizer = truedepth.load("default", dtype="fp32", plan="parallel=20:28")
    truedepth.save(model, tokenizer, lp_default)
    shape = "qwen2.5-0.5b"
    return [
        {
            "name": "default model (SmolLM2-135M)",
            "tp": 1,
            "dummy": False,
            "plans": {"base": default_model_dir(), "parallel=20:28": lp_default},
        },
        {
            "name": f"{shape} shape, random weights",
            "tp": 2,
            "dummy": True,
            "plans": {
                "base": save_config_folder(shape_config(shape), "base", work / "q-base"),
                "parallel=12:22": save_config_folder(shape_config(shape), "parallel=12:22", work / "q-lp"),
            },
        },
    ]


def bench(folder: Path, tp: int, batch: int, dummy: bool, iters: int, out: Path) -> dict:
    cmd = [
        VLLM,
        "bench",
        "latency",
        "--model",
        str(folder),
        "--tensor-parallel-size",
        str(tp),
        "--batch-size",
        str(batch),
        "--input-len",
        str(INPUT_LEN),
        "--output-len",
        str(OUTPUT_LEN),
        "--num-iters-warmup",
        "1",
        "--num-iters",
        str(iters),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--disable-detokenize",
        "--output-json",
        str(out),
    ]
    if dummy:
        cmd += ["--load-format", "dummy", "--skip-tokenizer-init"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, range(tp)))
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1200)
    result = json.loads(out.read_text())
    return {
        "latency_s": result["avg_latency"],
        "tokens_per_s": batch * OUTPUT_LEN / result["avg_latency"],
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "command": " ".join(cmd),
    }


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="docs/results/vllm_bench_cpu.json")
    parser.add_argument("--case", default="", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in (c for c in cases(work) if args.case in c["name"]):
            for batch in (1, 8):
                runs = {
                    plan: bench(folder, case["tp"], batch, case["dummy"], args.iters, work / "out.json")
                    for plan, folder in case["plans"].items()
                }
                base, lp = runs.values()
                row = {
                    "case": case["name"],
                    "tp": case["tp"],
                    "batch": batch,
                    "runs": runs,
                    "speedup": base["latency_s"] / lp["latency_s"],
                }
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
                rows.append(row)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared)",
        "input_len": INPUT_LEN,
        "output_len": OUTPUT_LEN,
        "iters": args.iters,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
