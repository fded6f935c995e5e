"""The package's shape (issue 11): layers that import only downward, no cycles, no CLI behind a
library import, small modules, pointers from the old module paths, one home for option defaults."""

from __future__ import annotations

import argparse
import dataclasses
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


@pytest.mark.parametrize("old, new", [("transform", "truedepth.core.transform"), ("models", "truedepth.core.loading"),
                                      ("fastgen", "truedepth.runtime.generate"), ("tp", "truedepth.runtime.distributed.tp"),
                                      ("search", "truedepth.apps.search"), ("commands.demo", "truedepth.cli")])
def test_old_module_paths_point_to_the_new_ones(old, new):
    for statement in (f"import truedepth.{old}", f"from truedepth import {old.split('.')[0]}"):
        result = run_python(statement)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"ModuleNotFoundError: truedepth.{old.split('.')[0]} moved to {new}"), last


def test_public_api_and_entry_points_still_work():
    result = run_python("import truedepth; from truedepth import load, apply_plan, parallelize, Plan, PlanError, "
                        "as_plan, Step, GRAMMAR_HELP; print(apply_plan.__module__, load.__module__)")
    assert result.stdout.split() == ["truedepth.core.transform", "truedepth.core.loading"], result.stderr
    for argv in ([sys.executable, "-m", "truedepth", "--help"], [str(Path(sys.executable).with_name("truedepth")), "plan",
                                                                  "parallel=2:6", "--layers", "8"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    assert "depth: 8 -> 6" in done.stdout


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > MAX_LINES}


def _parser_defaults(module: str) -> dict:
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


@pytest.mark.parametrize("command, options", [
    ("truedepth.cli.eval", "truedepth.measure.eval.evaluate:EvalOptions"),
    ("truedepth.cli.demo", "truedepth.apps.demo:DemoOptions"),
    ("truedepth.cli.bench", "truedepth.measure.bench.run:BenchOptions"),
    ("truedepth.cli.search", "truedepth.apps.search.run:SearchOptions"),
    ("truedepth.cli.finetune", "truedepth.apps.finetune.config:FinetuneOptions"),
])
def test_library_options_default_like_the_command(command, options):
    """A library user who leaves an option out gets what the command line gives."""
    import importlib

    module, name = options.split(":")
    cls = getattr(importlib.import_module(module), name)
    defaults = _parser_defaults(command)
    for f in dataclasses.fields(cls):
        if f.name in defaults and f.default is not dataclasses.MISSING:
            assert f.default == defaults[f.name] or (f.name == "plans" and defaults[f.name] is None), f.name
