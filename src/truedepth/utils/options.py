"""Each option is declared once: a dataclass field carries its default, type and help, and the command
line is built from it (in the spirit of litgpt's typed signatures; plain argparse underneath).

    @dataclass
    class TrainOptions:
        group_title = "training"                            # no annotation: not a field
        lr: float = option(3e-4, "peak AdamW learning rate")

    @dataclass
    class FinetuneOptions(ModelOptions, TrainOptions):      # composed of groups, not copied
        lr: float = override(1e-4)                          # same option, this command's default

    add_options(parser, FinetuneOptions)                    # --lr FLOAT  peak ... Default: 0.0001
    opts = from_args(FinetuneOptions, parser.parse_args())

A field made with `option()` is a command-line option (`--name-with-dashes`, its type from the
annotation, a bool is a switch); a plain field is library-only (e.g. the recorded command line).
A class's `group_title` puts its options under one heading in `--help`. A field whose default_factory
is such a dataclass (`tp: TPOptions = field(default_factory=TPOptions)`) adds that group's options, and
`from_args` fills it from them. `override()` changes only the
default of an option declared in a base class: its help, type and flag stay declared once (a command
may add a note on what the option means there, or keep an old spelling of it: see `override`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_OPTION = "truedepth_option"  # metadata key: the argparse settings of an option field
_OVERRIDE = "truedepth_override"  # metadata key: a field that only changes a base class option's default


def option(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple | None = None,
    required: bool = False,
    type: Any = None,
    show_default: bool = True,
    default_factory: Any = dataclasses.MISSING,
    nargs: Any = None,
    action: str | None = None,
    positional: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option.

    flag: the option string when it is not `--` + the field name with dashes (e.g. "--keep-checkpoints");
    required: the command line must give it (the library default stays, usually None);
    type: the argparse converter when the annotation's type is not it;
    show_default: append "Default: X" to the help (not for None/False defaults, nor when the help says it);
    nargs, action: as in argparse (e.g. nargs="+", action="append" for an option given several times);
    positional: a positional argument named after the field (`metavar` is its name in --help).
    """
    meta = {
        _OPTION: {
            "help": help,
            "flag": flag,
            "metavar": metavar,
            "choices": choices,
            "required": required,
            "type": type,
            "show_default": show_default,
            "nargs": nargs,
            "action": action,
            "positional": positional,
        }
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def override(
    default: Any = None,
    *,
    default_factory: Any = dataclasses.MISSING,
    default_help: str | None = None,
    help_note: str | None = None,
    flag: str | None = None,
    required: bool | None = None,
) -> Any:
    """A new default for an option that a base class declares (its help and flag are inherited).

    default_help: what this command's default means, when "Default: X" does not say it (e.g. None meaning
    "as many as fit"); it replaces the "Default: ..." that the help would show.
    help_note: what the option means in this command, added to the declared help (before its "Default:").
    flag: this command's spelling of the option where it has always been spelled differently (e.g. bench's
    `--prompt` for `prompt_tokens`, which tp-bench spells `--prompt-tokens`); the field name stays the same.
    required: the command line of this command must give it (e.g. an output folder one command needs)."""
    given = {
        k: v
        for k, v in (("default_help", default_help), ("help_note", help_note), ("flag", flag), ("required", required))
        if v is not None
    }
    meta = {_OVERRIDE: given or True}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_fields(cls: type) -> list[tuple[dataclasses.Field, dict[str, Any], type]]:
    """(field, its option settings, the class that declared it) for every command-line option of `cls`."""
    found = []
    for f in dataclasses.fields(cls):
        declared = _declaring_class(cls, f.name)
        if declared is not None:
            found.append((f, declared.__dataclass_fields__[f.name].metadata[_OPTION], declared))
    return found


def _declaring_class(cls: type, name: str) -> type | None:
    """The class in `cls`'s MRO whose own field `name` is an option (not an override); None: not an option."""
    for klass in cls.__mro__:
        own = klass.__dict__.get("__dataclass_fields__", {})
        if name in own and _OPTION in own[name].metadata and name in klass.__dict__.get("__annotations__", {}):
            return klass
    return None


def add_options(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """Add every option of the dataclass `cls` to `parser`, grouped by the class that declared it.

    A class attribute `mutually_exclusive = (("model", "shape"),)` makes each tuple's options exclusive."""
    hints = typing.get_type_hints(cls)
    groups: dict[Any, Any] = {}
    exclusive = {name: names for names in getattr(cls, "mutually_exclusive", ()) for name in names}
    for f, spec, declared in _exclusive_together(option_fields(cls), exclusive):
        if f.name in exclude:
            continue
        title = declared.__dict__.get("group_title")
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title] if title else parser
        if f.name in exclusive:
            if exclusive[f.name] not in groups:
                groups[exclusive[f.name]] = target.add_mutually_exclusive_group()
            target = groups[exclusive[f.name]]
        settings = _argparse_settings(f, _overridden_help(cls, f.name, spec), hints[f.name])
        if spec.get("positional"):
            target.add_argument(f.name, **settings)
            continue
        flag = _flag(cls, f.name, spec)
        if (
            flag != "--" + f.name.replace("_", "-")
            and "metavar" not in settings
            and "choices" not in settings
            and settings.get("type")
        ):
            settings["metavar"] = flag.lstrip("-").replace("-", "_").upper()  # the name the user types, not the field's
        target.add_argument(flag, dest=f.name, **settings)
    for f in dataclasses.fields(cls):
        if _nested(f) and f.name not in exclude:
            add_options(parser, f.default_factory, exclude=exclude)


def _exclusive_together(found: list, exclusive: dict[str, tuple[str, ...]]) -> list:
    """`found` with the options of each mutually exclusive tuple moved next to its first (one `[A | B]` in usage)."""
    ordered: list = []
    for item in found:
        if item in ordered:
            continue
        names = exclusive.get(item[0].name, (item[0].name,))
        ordered += [other for other in found if other[0].name in names and other not in ordered]
    return ordered


def _argparse_settings(f: dataclasses.Field, spec: dict[str, Any], hint: Any) -> dict[str, Any]:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kind = _plain_type(hint)
    settings: dict[str, Any] = {"default": default}
    if kind is bool and not spec.get("action"):
        settings["action"] = argparse.BooleanOptionalAction if default else "store_true"
    else:
        settings["type"] = spec["type"] or kind
        for key in ("metavar", "choices", "nargs", "action"):
            if spec.get(key):
                settings[key] = spec[key]
    if spec["required"]:
        settings["required"] = True
    if spec.get("positional") and spec.get("nargs") not in ("?", "*"):
        del settings["default"]  # a positional argument that must be given
    settings["help"] = _help_with_default(spec, default)
    return settings


def _overridden_help(cls: type, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` with the nearest override's `help_note` added to the help and its `default_help` replacing the
    help's "Default: ...", where it has them."""
    meta = _override_of(cls, name)
    text = spec["help"]
    if "help_note" in meta:
        head, said, tail = text.partition("Default:")
        text = f"{head.rstrip()} {meta['help_note']}" + (f" Default:{tail}" if said else "")
    if "default_help" in meta:
        text = f"{text.split('Default:')[0].rstrip()} Default: {meta['default_help']}"
    return dict(spec, help=text.strip(), required=meta.get("required", spec["required"])) if meta else spec


def _override_of(cls: type, name: str) -> dict[str, Any]:
    """The settings (default_help, help_note, flag) of the nearest override of option `name` in `cls`'s MRO."""
    for klass in cls.__mro__:
        own = klass.__dict__.get("__dataclass_fields__", {})
        if name in own and name in klass.__dict__.get("__annotations__", {}):
            meta = own[name].metadata.get(_OVERRIDE)
            if meta is not None:
                return meta if isinstance(meta, dict) else {}
            if _OPTION in own[name].metadata:
                return {}
    return {}


def _flag(cls: type, name: str, spec: dict[str, Any]) -> str:
    return _override_of(cls, name).get("flag") or spec["flag"] or "--" + name.replace("_", "-")


def _plain_type(hint: Any) -> Any:
    """int for `int`, `int | None` and `Optional[int]`; str for anything else that is not a bool/int/float."""
    args = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else [hint]
    )
    kind = args[0] if len(args) == 1 else str
    return kind if kind in (bool, int, float, str) else str


def _help_with_default(spec: dict[str, Any], default: Any) -> str:
    text = spec["help"].replace("%", "%%") if "%(" not in spec["help"] else spec["help"]
    shown = default is not None and default is not False  # 0 is a default worth showing, False and None are not
    if spec["show_default"] and shown and "Default:" not in text and not spec["required"]:
        text = f"{text.rstrip()} Default: %(default)s".strip()
    return text


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass `cls` filled from the parsed options of the same names; `extra` takes precedence."""
    given = {
        f.name: from_args(f.default_factory, args) if _nested(f) else getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.init and (_nested(f) or hasattr(args, f.name))
    }
    return cls(**(given | extra))


def _nested(f: dataclasses.Field) -> bool:
    """A field holding a group of options as one value (e.g. `tp: TPOptions = field(default_factory=TPOptions)`)."""
    return dataclasses.is_dataclass(f.default_factory) and isinstance(f.default_factory, type)


def flag_of(cls: type, name: str) -> str:
    """The command-line spelling of option `name` of `cls` (for messages)."""
    for f, spec, _ in option_fields(cls):
        if f.name == name:
            return f.name if spec.get("positional") else _flag(cls, name, spec)
    raise KeyError(name)  # programming error: not an option of cls


def option_names(cls: type) -> tuple[str, ...]:
    """The names of the command-line options of `cls` (e.g. a group's, to record or compare them)."""
    return tuple(f.name for f, _, _ in option_fields(cls))


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of the dataclass `cls` (an override's, where one applies)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def fill(cls: type, source: Any, *, exclude: tuple[str, ...] = (), **extra: Any) -> Any:
    """The dataclass `cls` made from the same-named fields of the dataclass `source` (e.g. the search's
    options from compress's); `extra` takes precedence, names in `exclude` keep `cls`'s defaults."""
    given = {
        f.name: getattr(source, f.name)
        for f in dataclasses.fields(cls)
        if f.init and f.name not in exclude and hasattr(source, f.name)
    }
    return cls(**(given | extra))
