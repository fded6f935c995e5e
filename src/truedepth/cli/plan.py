"""Show what a plan does to a model: the layers of the result, its depth, and the plan as JSON.

Example: truedepth plan parallel=14:24,skip=27 --layers 30
"""

from __future__ import annotations

import argparse
import json

from ..utils.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan string (see below) or JSON")
    parser.add_argument("--layers", type=int, default=None,
                        help="depth of the original model (default: read from --model's config)")
    parser.add_argument("--model", default="default", help="model whose config gives the depth (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the plan and its layout as one JSON object")


def num_layers(args: argparse.Namespace) -> int:
    if args.layers is not None:
        if args.layers < 1:
            raise UserError(f"--layers {args.layers}: a model has at least one layer; give its depth (e.g. 30), "
                            "or leave --layers out to read it from --model.")
        return args.layers
    from ..core.loading import read_config

    return read_config(args.model).num_hidden_layers


def run(args: argparse.Namespace) -> int:
    from ..core.plan import Plan

    plan = Plan.parse(args.plan)
    n = num_layers(args)
    blocks = plan.blocks(n)
    if args.json:
        print(json.dumps({**plan.to_dict(), "original_depth": n, "depth": len(blocks),
                          "layers": [{"kind": b.kind, "from": list(b.layers)} for b in blocks]}))
        return 0
    print(f"plan: {plan}\ndepth: {n} -> {len(blocks)}")
    for i, b in enumerate(blocks):
        what = {"keep": "layer", "parallel": "parallel (wide layer)", "merge": "merged average of"}[b.kind]
        print(f"  {i:3d}: {what} {', '.join(map(str, b.layers))}")
    return 0
