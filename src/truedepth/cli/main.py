"""The `truedepth` command. Each subcommand lives in its own module with two functions:

    add_arguments(parser)   declare its options
    run(args) -> int        do the work (imports heavy libraries lazily)

so `truedepth --help` stays fast and each capability stays in its module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..core.plan import GRAMMAR_HELP
from ..utils.env import keep_freed_memory
from ..utils.errors import UserError

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("truedepth.cli.demo", "the main job: quality and speed of LP plans on the default model"),
    "generate": ("truedepth.cli.generate", "generate text with a (transformed) model"),
    "eval": ("truedepth.cli.eval", "perplexity and lm-evaluation-harness tasks for a model and plan"),
    "bench": ("truedepth.cli.bench", "prefill/decode speed of the base model and plans (eager, compiled, fast)"),
    "sweep": ("truedepth.cli.sweep", "effective-depth study: sweep transforms over delta and start, plot"),
    "finetune": ("truedepth.cli.finetune", "fine-tune only the parallelized layers to win quality back"),
    "search": ("truedepth.cli.search", "search for the layer groups that cost least at a target depth"),
    "compress": ("truedepth.cli.compress", "search, fine-tune, evaluate and save a shallower model in one command"),
    "plan": ("truedepth.cli.plan", "show what a plan does to a model: layers, depth, JSON"),
    "export": ("truedepth.cli.export", "write a (transformed) model as a GGUF file for llama.cpp"),
    "fetch-assets": ("truedepth.cli.fetch_assets", "fetch the offline model and texts once (set-up)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="truedepth",
        description="Layer Parallelism for Hugging Face causal LMs: run groups of consecutive layers in "
        "parallel, measure the quality cost and the speed-up, win quality back.",
        epilog=GRAMMAR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_debug_argument(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("truedepth"):
                continue  # command not built yet
            raise
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text).strip(),
            epilog=GRAMMAR_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        add_debug_argument(p)
        p.set_defaults(_module=mod)
    return parser


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error (also: TRUEDEPTH_DEBUG=1)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False) or os.environ.get("TRUEDEPTH_DEBUG", "") not in ("", "0")
    keep_freed_memory()  # before any tensor exists: large blocks are reused, not mapped afresh each step
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"truedepth {args.command}: interrupted. {interrupt_note(args)}", file=sys.stderr)
        return 130
    except UserError as e:  # only these are the user's to fix; any other exception is a bug and keeps its traceback
        if debug:
            raise
        print(f"truedepth {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] + (" (more with --debug)" if len(lines) > 1 else "")) if lines else type(e).__name__


def interrupt_note(args: argparse.Namespace) -> str:
    """What an interrupted command kept and how to go on (a command module may say it: resume_note(args))."""
    note = getattr(args._module, "resume_note", None)
    return note(args) if callable(note) else "Nothing was saved."


if __name__ == "__main__":
    sys.exit(main())
