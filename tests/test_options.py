"""truedepth.utils.options: a dataclass field declared with option() is a command-line option; the command
line is built from it and read back into the dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from truedepth.utils.options import add_options, default_of, flag_of, from_args, option, option_names, override


@dataclass
class Sizes:
    group_title = "sizes"  # no annotation: a heading in --help, not a field
    tokens: int = option(128, "tokens to score.")
    stride: int | None = option(None, "sliding-window stride (default: the window)")
    lr: float = option(3e-4, "learning rate.")
    name: str = option("default", "a name.")
    seed: int = option(0, "random seed.")


@dataclass
class Switches:
    quick: bool = option(False, "a tiny run")
    progress: bool = option(True, "progress bars")
    keep: bool = option(False, "keep the checkpoints", flag="--keep-checkpoints")


@dataclass
class Nested:
    group_title = "nested group"
    timeout_s: float = option(5.0, "seconds to wait.", flag="--timeout", metavar="SECONDS")


@dataclass
class Command(Switches, Sizes):
    tokens: int = override(64)
    lr: float = override(None, default_help="the model's own")
    seed: int = override(1, help_note="of the shuffle orders.")
    name: str = override("default", flag="--label")
    recorded: str = ""  # a plain field: library-only, not an option
    nested: Nested = field(default_factory=Nested)


def parser_for(*classes: type, **kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t", formatter_class=lambda prog: argparse.HelpFormatter(prog, width=200))
    for cls in classes:
        add_options(parser, cls, **kw)
    return parser


def action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def test_types_come_from_the_annotations():
    parser = parser_for(Sizes)
    assert action(parser, "tokens").type is int and action(parser, "lr").type is float
    assert action(parser, "stride").type is int  # int | None: an int that may be left out
    assert action(parser, "name").type is str
    args = parser.parse_args(["--tokens", "7", "--stride", "3", "--lr", "0.5"])
    assert (args.tokens, args.stride, args.lr, args.name) == (7, 3, 0.5, "default")
    assert parser.parse_args([]).stride is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--tokens", "many"])


def test_a_bool_is_a_switch_and_a_true_default_can_be_turned_off():
    parser = parser_for(Switches)
    assert isinstance(action(parser, "quick"), argparse._StoreTrueAction)
    assert isinstance(action(parser, "progress"), argparse.BooleanOptionalAction)
    args = parser.parse_args(["--quick", "--no-progress", "--keep-checkpoints"])
    assert (args.quick, args.progress, args.keep) == (True, False, True)
    args = parser.parse_args([])
    assert (args.quick, args.progress, args.keep) == (False, True, False)


def test_help_shows_the_default_where_it_says_something():
    text = parser_for(Sizes, Switches).format_help()
    assert "tokens to score. Default: 128" in text
    assert "random seed. Default: 0" in text  # 0 is a default worth showing
    assert "sliding-window stride (default: the window)\n" in text  # None: nothing added
    assert "a tiny run\n" in text  # False: nothing added


def test_override_changes_the_default_and_keeps_the_help_and_type():
    parser = parser_for(Command)
    assert action(parser, "tokens").default == 64 and action(parser, "tokens").type is int
    text = parser.format_help()
    assert "tokens to score. Default: 64" in text  # the help declared once, the command's default
    assert "learning rate. Default: the model's own" in text  # default_help says what None means here
    assert "random seed. of the shuffle orders. Default: 1" in text  # help_note: what it means here
    assert "--label LABEL" in text and "--name" not in text  # this command's spelling of `name`
    assert default_of(Command, "tokens") == 64 and default_of(Sizes, "tokens") == 128
    assert Command().tokens == 64 and Sizes().tokens == 128  # a library user gets the command's default


def test_group_titles_head_their_options_in_help():
    parser = parser_for(Command)
    titles = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert titles["sizes"] == {"tokens", "stride", "lr", "name", "seed"}
    assert titles["nested group"] == {"timeout_s"}
    assert {"quick", "progress", "keep"} <= titles["options"]  # Switches has no title


def test_a_nested_group_round_trips():
    parser = parser_for(Command)
    opts = from_args(Command, parser.parse_args(["--timeout", "9", "--label", "x", "--seed", "4"]))
    assert opts.nested == Nested(timeout_s=9.0) and (opts.name, opts.seed) == ("x", 4)
    assert from_args(Command, parser.parse_args([])) == Command()  # the command line's defaults are the library's
    assert option_names(Command)[:2] == ("tokens", "stride") and "recorded" not in option_names(Command)


def test_from_args_takes_extra_values_over_the_parsed_ones():
    parser = parser_for(Command)
    opts = from_args(Command, parser.parse_args(["--tokens", "5"]), tokens=6, recorded="truedepth x")
    assert (opts.tokens, opts.recorded) == (6, "truedepth x")
    partial = argparse.Namespace(tokens=3)  # options a parser does not have keep the dataclass default
    assert from_args(Sizes, partial) == Sizes(tokens=3)


def test_flag_of_names_the_spelling_the_user_types():
    assert flag_of(Sizes, "tokens") == "--tokens"
    assert flag_of(Switches, "keep") == "--keep-checkpoints"
    assert flag_of(Command, "name") == "--label" and flag_of(Sizes, "name") == "--name"
    with pytest.raises(KeyError):
        flag_of(Command, "recorded")


def test_exclude_leaves_options_out():
    parser = parser_for(Command, exclude=("stride", "timeout_s"))
    dests = {a.dest for a in parser._actions}
    assert "stride" not in dests and "timeout_s" not in dests and "tokens" in dests


@dataclass
class Extras:
    mutually_exclusive = (("model", "shape"),)
    model: str | None = option(None, "a model")
    plans: list[str] | None = option(
        None, "a plan (repeat for several)", flag="--plan", action="append", metavar="PLAN"
    )
    impls: list[str] = option(
        default_factory=lambda: ["local"], help="implementations", nargs="+", choices=("local", "dtensor")
    )
    shape: str | None = option(None, "a shape")
    prompt: str | None = option(None, "text to continue", positional=True)


def test_positional_append_nargs_and_mutually_exclusive_options():
    parser = parser_for(Extras)
    args = parser.parse_args(["hello", "--plan", "a", "--plan", "b", "--impls", "local", "dtensor", "--shape", "s"])
    assert from_args(Extras, args) == Extras(plans=["a", "b"], impls=["local", "dtensor"], shape="s", prompt="hello")
    assert from_args(Extras, parser.parse_args(["hi"])) == Extras(prompt="hi")
    assert "[--model MODEL | --shape SHAPE]" in parser.format_usage()  # the exclusive pair stays together
    with pytest.raises(SystemExit):
        parser.parse_args(["hi", "--model", "m", "--shape", "s"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # the positional argument must be given
    assert flag_of(Extras, "prompt") == "prompt"
