"""Export a model (base, transformed with --plan, or a saved LP model) to GGUF for llama.cpp.

Example: truedepth export --model default --plan parallel=20:28 --gguf lp.gguf --type q8_0

The file uses llama.cpp's `deci` architecture (per-layer head counts and MLP widths), so stock
llama.cpp, llama-cpp-python, Ollama and LM Studio run it. See docs/GGUF.md.
"""

from __future__ import annotations

import argparse

from .common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..deploy.gguf import TYPES

    add_model_arguments(parser)
    parser.add_argument("--gguf", required=True, metavar="PATH", help="GGUF file to write")
    parser.add_argument("--type", default="f32", type=str.lower, metavar="TYPE",
                        help=f"tensor type: {', '.join(TYPES)} (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")


def run(args: argparse.Namespace) -> int:
    from ..deploy.gguf import check_path, check_type, export_gguf
    from ..core.loading import load
    from ..core.plan import as_plan

    # everything that can be refused without the weights is refused before loading them
    check_type(args.type)
    check_path(args.gguf, args.overwrite)
    if args.dtype not in (None, "fp32", "float32"):
        raise ValueError("export reads the weights in fp32 and converts them itself; drop --dtype and use --type.")
    plan = as_plan(args.plan)
    # --device only says where the plan is applied; the tensors are written from the CPU
    model, tokenizer = load(args.model, dtype="fp32", device=args.device or "cpu", plan=plan)
    path = export_gguf(model, tokenizer, args.gguf, type=args.type, overwrite=args.overwrite)
    info = getattr(model.config, "truedepth", None) or {}
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type}, "
          f"{model.config.num_hidden_layers} layers, layer widths {info.get('layer_widths', 'all 1')})")
    return 0
