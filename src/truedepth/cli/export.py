"""Export a model (base, transformed with --plan, or a saved LP model) to GGUF for llama.cpp.

Example: truedepth export --model default --plan parallel=20:28 --gguf lp.gguf --type q8_0

The file uses llama.cpp's `deci` architecture (per-layer head counts and MLP widths), so stock
llama.cpp, llama-cpp-python, Ollama and LM Studio run it. See docs/GGUF.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..core.loading import ModelOptions, PlanOption
from ..deploy.gguf import GGUFOptions
from ..utils.errors import UserError
from ..utils.options import add_options, from_args


@dataclass  # bases in reverse order: --help lists the last base's options first
class ExportOptions(GGUFOptions, PlanOption, ModelOptions):
    """What `truedepth export` takes (see its --help)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ExportOptions)


def run(parsed: argparse.Namespace) -> int:
    from ..core.loading import load
    from ..core.plan import as_plan
    from ..deploy.gguf import check_path, check_type, export_gguf

    args = from_args(ExportOptions, parsed)
    # everything that can be refused without the weights is refused before loading them
    check_type(args.type)
    check_path(args.gguf, args.overwrite)
    if args.dtype not in (None, "fp32", "float32"):
        raise UserError("export reads the weights in fp32 and converts them itself; drop --dtype and use --type.")
    plan = as_plan(args.plan)
    # --device only says where the plan is applied; the tensors are written from the CPU
    model, tokenizer = load(args.model, dtype="fp32", device=args.device or "cpu", plan=plan)
    path = export_gguf(model, tokenizer, args.gguf, type=args.type, overwrite=args.overwrite)
    from ..core.arch import recorded_widths, transformed_record

    widths = recorded_widths(model.config) if transformed_record(model.config) else "all 1"
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type}, "
        f"{model.config.num_hidden_layers} layers, layer widths {widths})"
    )
    return 0
