"""Options that several commands share, and turning parsed options into the library's arguments."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..runtime.distributed.tp import IMPLEMENTATIONS, TPOptions


def add_model_arguments(parser: argparse.ArgumentParser, plan: bool = True) -> None:
    """Options shared by every command that loads a model."""
    parser.add_argument("--model", default="default",
                        help="'default' (offline SmolLM2-135M-Instruct), a hub id, or a local folder "
                             "(plain HF or saved truedepth model). Default: %(default)s")
    if plan:
        parser.add_argument("--plan", default="base", help="plan to apply after loading; see `truedepth plan --help`. "
                                                          "Default: %(default)s (the original model)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_tp_arguments(parser: Any) -> None:
    """`--tp` and `--tp-timeout` (run under `torchrun --nproc_per_node=N`)."""
    group = parser.add_argument_group("tensor parallelism (launch with torchrun --nproc_per_node=N -m truedepth ...)")
    group.add_argument("--tp", action="store_true",
                       help="shard every layer (wide or not) over the N torchrun processes: column-parallel "
                            "q/k/v/gate/up, row-parallel o/down, 2 all-reduces per layer. NCCL on GPUs, gloo "
                            "on CPU; only rank 0 prints results.")
    group.add_argument("--tp-timeout", type=float, default=TPOptions.timeout_s, metavar="SECONDS",
                       help="a collective that waits longer than this (a rank died or hangs) stops every rank "
                            "with an error instead of hanging. Default: %(default)s")
    group.add_argument("--tp-impl", choices=IMPLEMENTATIONS, default=TPOptions.impl,
                       help="dtensor: PyTorch's tensor-parallel API (parallelize_module); local: plain sharded "
                            "weights and one torch.distributed.all_reduce per row-parallel layer, the same "
                            "collectives with less per-op overhead in eager mode. Default: %(default)s")


def tp_options(args: argparse.Namespace) -> TPOptions:
    return TPOptions(enabled=bool(getattr(args, "tp", False)), timeout_s=args.tp_timeout, impl=args.tp_impl) \
        if getattr(args, "tp", False) else TPOptions()


def options(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass `cls` filled from the parsed options of the same names (and `extra`)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **extra})  # `extra` wins: e.g. tp=TPOptions(...) over the --tp flag
