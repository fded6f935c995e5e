"""Show what a plan does to a model: the layers of the result, its depth, and the plan as JSON.

Example: truedepth plan parallel=14:24,skip=27 --layers 30
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..core.loading import ModelOptions
from ..utils.errors import UserError
from ..utils.options import add_options, from_args, option, override
from .common import Printing

NOT_TAKEN = ("dtype", "device")  # only the model's config is read


@dataclass  # bases in reverse order: --help lists the last base's options first
class PlanShow(Printing, ModelOptions):
    """What `truedepth plan` takes (see its --help)."""

    plan_text: str | None = option(None, "plan string (see below) or JSON", positional=True, metavar="plan")
    layers: int | None = option(None, "depth of the original model (default: read from --model's config)")
    model: str = override("default", help_note="Only its config is read, for the depth.")
    json: bool = override(False, help_note="(the plan and its layout)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, PlanShow, exclude=NOT_TAKEN)


def num_layers(args: PlanShow) -> int:
    if args.layers is not None:
        if args.layers < 1:
            raise UserError(
                f"--layers {args.layers}: a model has at least one layer; give its depth (e.g. 30), "
                "or leave --layers out to read it from --model."
            )
        return args.layers
    from ..core.loading import read_config

    return read_config(args.model).num_hidden_layers


def run(parsed: argparse.Namespace) -> int:
    from ..core.plan import Plan

    args = from_args(PlanShow, parsed)
    plan = Plan.parse(args.plan_text)
    n = num_layers(args)
    blocks = plan.blocks(n)
    if args.json:
        print(
            json.dumps(
                {
                    **plan.to_dict(),
                    "original_depth": n,
                    "depth": len(blocks),
                    "layers": [{"kind": b.kind, "from": list(b.layers)} for b in blocks],
                }
            )
        )
        return 0
    print(f"plan: {plan}\ndepth: {n} -> {len(blocks)}")
    for i, b in enumerate(blocks):
        what = {"keep": "layer", "parallel": "parallel (wide layer)", "merge": "merged average of"}[b.kind]
        print(f"  {i:3d}: {what} {', '.join(map(str, b.layers))}")
    return 0
