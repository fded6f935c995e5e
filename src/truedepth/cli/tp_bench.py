"""Decode speed under tensor parallelism, base model against LP plans, in one torchrun launch.

    torchrun --nproc_per_node=2 -m truedepth.cli.tp_bench --model llama-2-7b --plan base --plan parallel=16:30

What is measured and how: truedepth.measure.bench.tp_bench.
"""

from __future__ import annotations

import argparse
import sys

from ..measure.bench.tp_bench import format_table, plot, tp_bench
from ..runtime.distributed import tp
from ..utils.env import keep_freed_memory
from ..utils.io import atomic_write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="a shape (llama-2-7b, llama-3.2-3b, qwen2.5-0.5b, tiny ...: random weights), "
                             "'default', a hub id or a folder (real weights). Default: %(default)s")
    parser.add_argument("--plan", action="append", dest="plans", metavar="PLAN",
                        help="a plan to measure; repeat for several. Default: base and 'auto' (a paper-like "
                             "range of about 44%% of the layers in pairs)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per plan")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda (each rank its LOCAL_RANK GPU) or cpu (gloo)")
    parser.add_argument("--tp-timeout", type=float, default=tp.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="stop every rank with an error when a collective waits longer. Default: %(default)s")
    parser.add_argument("--tp-impl", nargs="+", choices=tp.IMPLEMENTATIONS, default=[tp.DEFAULT_IMPL], dest="impls",
                        help="TP implementation(s) to measure: dtensor (PyTorch parallelize_module), local (plain "
                             "sharded weights + torch.distributed.all_reduce). Default: dtensor")
    parser.add_argument("--json", default=None, help="write the results to this JSON file (rank 0)")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) of ms/token split into all-reduces "
                                                     "and the rest (rank 0)")


def run(args: argparse.Namespace) -> int:
    result = tp_bench(args.model, args.plans or ("base", "auto"), impls=args.impls, prompt_tokens=args.prompt_tokens,
                      new_tokens=args.new_tokens, warmup=args.warmup, batch=args.batch, dtype=args.dtype,
                      device=args.device, timeout_s=args.tp_timeout)
    if tp.is_main():
        print(format_table(result))
        if args.json:
            atomic_write_json(args.json, result, indent=2)
            print(f"wrote {args.json}")
        if args.plot:
            print(f"wrote {plot(result, args.plot)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..measure.bench import tp_bench as library

    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m truedepth.cli.tp_bench",
                                     description=(library.__doc__ or __doc__).strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if tp.is_main() or not isinstance(e, tp.TPError):  # a TPError is the same on every rank: say it once
            print(f"truedepth tp_bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
