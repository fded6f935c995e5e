"""Prefill latency and decode throughput of the base model and LP plans, in one run.

For the base model and every --plan it measures prefill latency at a few prompt lengths and
decode speed (tokens/s per sequence and in total) under each --mode:

  eager      transformers `generate`, dynamic KV cache, no compilation
  compiled   transformers `generate` with its static cache and torch.compile (its own path)
  fast       truedepth's lean loop: static cache, one compiled token step (CUDA graphs on GPU),
             no per-token host sync (truedepth.runtime.generate)
  fused      the lean loop with q/k/v and gate/up each run as one GEMM in every layer

Decode speed = (new - k) / (time for `new` tokens - time for k = new/8 tokens): the prefill
and other once-per-call costs cancel, so the modes compare on their per-token cost. Every time
is the median of --repeats runs after --warmup runs, the device synchronised around each run. Ratios are against the base model in the same mode and
batch ("x base") and against the base model under transformers' compiled path ("x HF comp.").
The run also measures the device's copy bandwidth and reports the fraction of the
bandwidth bound reached: (weight bytes + KV-cache bytes read per step) / step time / bandwidth.

--shape builds random-weight models of published sizes on the device (no download): speed does
not depend on weight values. Examples:

  truedepth bench --shape llama-2-7b                       # base vs its default plan parallel=16:30
  truedepth bench --shape llama-3.2-3b --plan parallel=14:24 --batch 1,8,32 --json b.json --plot b.png
  truedepth bench --model default --mode eager,fast --new 64  # the real offline default model on CPU
"""

from __future__ import annotations

import argparse

from ..measure.bench.decode import MODES
from ..measure.bench.run import BenchOptions, run_bench
from .common import options


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="'default' (offline SmolLM2-135M-Instruct), a hub id or a local folder. Default: the "
                          "default model unless --shape is given")
    src.add_argument("--shape", default=None,
                     help="random-weight model of a published size, no download: llama-2-7b, llama-3.2-3b, "
                          "llama-3.1-8b, qwen2.5-7b, smollm2-135m (= the default model's shape), tiny")
    parser.add_argument("--plan", action="append", default=None,
                        help="a plan to compare with the base model (repeat for several). Default: the shape's "
                             "usual plan (llama-2-7b: parallel=16:30, llama-3.2-3b: parallel=14:24, ...)")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated (default %(default)s)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default %(default)s)")
    parser.add_argument("--new", type=int, default=None, help="new tokens per generation (default 256 on GPU, "
                                                              "64 on CPU)")
    parser.add_argument("--mode", default=None, help=f"comma-separated from {', '.join(MODES)} (default: all on "
                                                     "GPU; eager,fast on CPU, where compiling takes minutes)")
    parser.add_argument("--prefill", default=None,
                        help="prompt lengths for the prefill latency, comma-separated (default 128,512,2048 on GPU, "
                             "128,512 on CPU); 'none' to skip")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is "
                                                              "reported (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s; the "
                                                             "first run of a compiled mode compiles)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend for the compiled modes (default %(default)s; 'eager' or "
                             "'aot_eager' skip code generation: for debugging only)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write one record per model, plan, mode "
                                                                    "and batch (rewritten after each record)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--plot", default=None, metavar="FILE", help="plot decode tokens/s per plan, mode and "
                                                                    "batch (PNG/SVG/PDF; needs matplotlib)")
    parser.add_argument("--sequential", action="store_true",
                        help="hold one model in memory at a time (default: base and every plan together, their "
                             "timed runs alternating, so load that drifts during the run affects all alike)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")


def run(args: argparse.Namespace) -> int:
    return run_bench(options(BenchOptions, args))
