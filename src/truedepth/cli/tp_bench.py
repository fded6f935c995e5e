"""Decode speed under tensor parallelism, base model against LP plans, in one torchrun launch.

    torchrun --nproc_per_node=2 -m truedepth.cli.tp_bench --model llama-2-7b --plan base --plan parallel=16:30

What is measured and how: truedepth.measure.bench.tp_bench.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ..measure.bench.tp_bench import NOT_TAKEN, TPBenchOptions, format_table, plot, run_tp_bench
from ..runtime.distributed import tp
from ..utils.env import keep_freed_memory
from ..utils.errors import UserError
from ..utils.io import atomic_write_json
from ..utils.options import add_options, from_args, override
from ..utils.shared_options import JsonFileOption, PlotFileOption


@dataclass
class TPBenchOutput(PlotFileOption, JsonFileOption):
    """Files rank 0 writes the results to."""

    json_file: str | None = override(None, help_note="(Rank 0.)")
    plot: str | None = override(
        None, help_note="A bar chart (PNG) of ms/token split into all-reduces and the rest (rank 0)."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TPBenchOptions, exclude=NOT_TAKEN)
    add_options(parser, TPBenchOutput)


def run(args: argparse.Namespace) -> int:
    result = run_tp_bench(from_args(TPBenchOptions, args))
    out = from_args(TPBenchOutput, args)
    if tp.is_main():
        print(format_table(result))
        if out.json_file:
            atomic_write_json(out.json_file, result, indent=2)
            print(f"wrote {out.json_file}")
        if out.plot:
            print(f"wrote {plot(result, out.plot)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..measure.bench import tp_bench as library

    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m truedepth.cli.tp_bench",
        description=(library.__doc__ or __doc__).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return run(args)
    except UserError as e:  # anything else is a bug and keeps its traceback
        if tp.is_main() or not isinstance(e, tp.TPError):  # a TPError is the same on every rank: say it once
            print(f"truedepth tp_bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
