"""The package's shape (issue 11): layers that import only downward, no cycles, no CLI behind a
library import, small modules, pointers from the old module paths, one home for option defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "truedepth"
ROOT = SRC.parents[1]
MAX_LINES = 500


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_import_linter_contracts_hold():
    """pyproject.toml's [tool.importlinter]: the layers contract and no import cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_importing_truedepth_loads_no_cli_module():
    result = run_python("import sys, truedepth; print(sorted(m for m in sys.modules if m.startswith('truedepth.cli')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


OLD_PATHS = [
    ("transform", "truedepth.core.transform"),
    ("models", "truedepth.core.loading"),
    ("fastgen", "truedepth.runtime.generate"),
    ("tp", "truedepth.runtime.distributed.tp"),
    ("search", "truedepth.apps.search"),
    ("commands.demo", "truedepth.cli"),
]
# Runs each statement in a fresh namespace and prints, per statement, the last line its traceback
# would end with (None: it raised nothing): one interpreter for all of them, not one each (every
# fresh `import truedepth` costs about 5 s).
IMPORT_PROBE = r"""
import json, sys, traceback
errors = {}
for statement in json.loads(sys.argv[1]):
    try:
        exec(statement, {})
        errors[statement] = None
    except BaseException as e:
        errors[statement] = traceback.format_exception_only(e)[-1].strip()
print(json.dumps(errors))
"""


def old_path_statements(old: str) -> tuple[str, str]:
    return f"import truedepth.{old}", f"from truedepth import {old.split('.')[0]}"


@pytest.fixture(scope="module")
def old_path_errors() -> dict[str, str | None]:
    statements = [s for old, _ in OLD_PATHS for s in old_path_statements(old)]
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, json.dumps(statements)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("old, new", OLD_PATHS)
def test_old_module_paths_point_to_the_new_ones(old_path_errors, old, new):
    for statement in old_path_statements(old):
        last = old_path_errors[statement]
        assert last is not None, f"{statement} raised nothing"
        assert last.startswith(f"ModuleNotFoundError: truedepth.{old.split('.')[0]} moved to {new}"), last


def test_public_api_and_entry_points_still_work():
    result = run_python(
        "import truedepth; from truedepth import load, apply_plan, parallelize, Plan, PlanError, "
        "as_plan, Step, GRAMMAR_HELP; print(apply_plan.__module__, load.__module__)"
    )
    assert result.stdout.split() == ["truedepth.core.transform", "truedepth.core.loading"], result.stderr
    for argv in (
        [sys.executable, "-m", "truedepth", "--help"],
        [str(Path(sys.executable).with_name("truedepth")), "plan", "parallel=2:6", "--layers", "8"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    assert "depth: 8 -> 6" in done.stdout


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > MAX_LINES}


def _reads_of_the_truedepth_record(tree) -> list[int]:
    """Lines that read the `truedepth` config record directly: `x.truedepth`, getattr/hasattr(x,
    "truedepth"), x.get("truedepth"), x["truedepth"]."""
    import ast

    def named(node) -> bool:
        return isinstance(node, ast.Constant) and node.value == "truedepth"

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "truedepth":
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and len(node.args) >= 2
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and named(node.args[1])
        ):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and named(node.args[0])
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and named(node.slice):
            lines.append(node.lineno)
    return lines


def test_the_truedepth_record_is_read_only_in_core():
    """Outside core/, the record a transform leaves in the config is read through core.arch's accessors
    (transformed_record, current_plan, recorded_widths, original_depth, layer_widths)."""
    import ast

    found = {
        f"{p.relative_to(SRC)}:{line}"
        for p in SRC.rglob("*.py")
        if p.relative_to(SRC).parts[0] != "core"
        for line in _reads_of_the_truedepth_record(ast.parse(p.read_text()))
    }
    assert not found, f"read the config record through truedepth.core.arch's accessors: {sorted(found)}"
    # the check itself sees each spelling
    code = (
        "a = config.truedepth\nb = getattr(config, 'truedepth', None)\nc = d.get('truedepth')\n"
        "e = d['truedepth']\nimport truedepth\nf = truedepth.__version__\ng = 'config.truedepth'\n"
    )
    assert _reads_of_the_truedepth_record(ast.parse(code)) == [1, 2, 3, 4]


def test_the_command_line_declares_no_option_itself():
    """Every option of every command comes from a dataclass (utils.options.add_options); the one
    `add_argument` in cli/ is main.py's --debug, which every command has."""
    import ast

    calls = []
    for path in sorted((SRC / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
                first = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
                calls.append((path.name, first))
    assert calls == [("main.py", "--debug")], calls


def _option_declarations() -> dict[str, set[str]]:
    """option name -> the dataclasses in truedepth's modules that declare it with option() (an override()
    only changes a declared option's default, so it is not a declaration)."""
    import importlib
    import pkgutil

    import truedepth
    from truedepth.utils.options import _OPTION

    found: dict[str, set[str]] = {}
    for info in pkgutil.walk_packages(truedepth.__path__, "truedepth."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # an optional dependency (vllm, llama_cpp ...) that is not installed
            assert e.name and not e.name.startswith("truedepth"), e
            continue
        for cls in vars(module).values():
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == info.name:
                own = cls.__dict__.get("__dataclass_fields__", {})
                for name in cls.__dict__.get("__annotations__", {}):
                    if name in own and _OPTION in own[name].metadata:
                        found.setdefault(name, set()).add(f"{cls.__module__}.{cls.__qualname__}")
    return found


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    import importlib

    main = importlib.import_module("truedepth.cli.main")  # the module: truedepth.cli.main is also its function
    tp_bench = importlib.import_module("truedepth.cli.tp_bench")
    parser = main.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(main.COMMANDS)
    tp = argparse.ArgumentParser()
    tp_bench.add_arguments(tp)  # launched with torchrun -m truedepth.cli.tp_bench: not a subcommand
    return {**commands, "tp-bench": tp}


# Field names that two different options share: the same spelling, a different meaning in each command (so
# composing one class would be wrong). Each entry says why; any other name declared twice is a copy.
SAME_NAME_OTHER_MEANING = {
    "tokens": "training tokens of a fine-tune vs tokens of text scored for perplexity",
    "batch_size": "sequences per training step vs windows per perplexity forward",
    "target_depth": "search: a list or range of depths vs compress: one depth",
    "report": "search: the text final plans are reported on vs sweep: a Markdown report file",
    "out": "search: a JSON file vs an output folder (OutDirOption) elsewhere",
}


def test_every_option_is_declared_once_in_a_dataclass():
    """Each option of each command is a field declared with option() in one dataclass: a command that
    takes an option another declares composes that class (override() may change its default)."""
    declared = _option_declarations()
    twice = {name: sorted(classes) for name, classes in declared.items() if len(classes) > 1}
    assert set(twice) <= set(SAME_NAME_OTHER_MEANING), (
        f"options declared in more than one class (compose the one class instead): "
        f"{ {k: v for k, v in twice.items() if k not in SAME_NAME_OTHER_MEANING} }"
    )
    assert all(len(twice.get(name, ())) == 2 for name in SAME_NAME_OTHER_MEANING), twice  # no third copy hides there
    for command, parser in _command_parsers().items():
        dests = {a.dest for a in parser._actions if a.dest not in ("help", "debug")}
        assert dests, command
        assert not dests - set(declared), (command, sorted(dests - set(declared)))


def test_compress_uses_only_the_public_names_of_search_and_finetune():
    """apps/compress imports search and finetune at package level (their __init__'s public API), never a
    module inside them."""
    import ast

    inside = []
    for path in (SRC / "apps" / "compress").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                dots = node.level
            elif isinstance(node, ast.Import):
                names, dots = [a.name for a in node.names], 0
            else:
                continue
            for name in names:
                parts = name.split(".")
                if (
                    dots == 2
                    and parts[0] in ("search", "finetune")
                    and len(parts) > 1
                    or dots == 0
                    and parts[:2] == ["truedepth", "apps"]
                    and len(parts) > 3
                ):
                    inside.append(f"{path.name}: {'.' * dots}{name}")
    assert not inside
