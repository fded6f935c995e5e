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
is the median of --repeats runs after --warmup runs, the device synchronised around each run.
Ratios are against the base model in the same mode and batch ("x base") and against the base
model under transformers' compiled path ("x HF comp.").
The run also measures the device's copy bandwidth and reports the fraction of the
bandwidth bound reached: (weight bytes + KV-cache bytes read per step) / step time / bandwidth.

--shape builds random-weight models of published sizes on the device (no download): speed does
not depend on weight values. Examples:

  truedepth bench --shape llama-2-7b                       # base vs its default plan parallel=16:30
  truedepth bench --shape llama-3.2-3b --plan parallel=14:24 --batch 1,8,32 --json b.json --plot b.png
  truedepth bench --model default --mode eager,fast --new 64  # the real offline default model on CPU

--engine vllm / llama.cpp measures the same models inside a serving engine under load: each model gets
its own server on 127.0.0.1 (`vllm serve`, or `llama-server` with a GGUF exported here), and vLLM's
benchmark client (`vllm bench serve`) sends random prompts at every --concurrency level, the models
taking turns. It reports output tokens/s, time per output token (mean, p99) and time to first token,
median and spread over --repeats, LP against base; every server is stopped on any exit, Ctrl-C included.

  truedepth bench --engine vllm --plan parallel=20:28 --concurrency 1,4,8,16 --json load.json --plot load.png
  truedepth bench --engine vllm --shape qwen2.5-0.5b --plan parallel=12:22 --tensor-parallel-size 2
  truedepth bench --engine llama.cpp --plan parallel=20:28 --gguf-type q8_0 --concurrency 1,4,8
"""

from __future__ import annotations

import argparse

from ..deploy.engine_bench import run_engine_bench
from ..measure.bench.benchmark import BenchOptions, run_bench
from ..utils.options import add_options, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, BenchOptions)


def run(args: argparse.Namespace) -> int:
    options = from_args(BenchOptions, args)
    return run_bench(options) if options.engine == "transformers" else run_engine_bench(options)
