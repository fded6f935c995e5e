"""One error policy (issue 29): an error the user can cause (a bad option, path, plan, text spec, model, a
missing asset, a measurement the options cannot support) is a `truedepth.utils.errors.UserError` or one
of its subclasses, and the CLI prints it as one line with exit code 2. Every other exception is a bug and
keeps its traceback, wherever it was raised.

So `src/` raises no bare ValueError/RuntimeError/FileNotFoundError/KeyError, except where the raise
signals a programming error (an internal invariant, an impossible state): those carry the comment
`# programming error: <why>` on the raise line or the line above. That comment is the allow-list: it
moves with the code (no line numbers to rot), and there must stay few of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import truedepth
from truedepth.cli.main import main
from truedepth.utils.errors import InputPathError, UserError

SRC = Path(truedepth.__file__).resolve().parent
BARE = {"ValueError", "RuntimeError", "FileNotFoundError", "KeyError"}
MARK = "# programming error:"
MAX_PROGRAMMING_ERRORS = 20  # a handful of invariants; a longer list means user errors are hiding in it


def source_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def packages() -> list[str]:
    """Parameters for the scan: one per package folder, so a failure names where to look."""
    return sorted({str(p.parent.relative_to(SRC)) for p in source_files()})


def bare_raises(files: list[Path], root: Path = SRC) -> list[tuple[str, int, str, bool]]:
    """(file, line, exception name, allowed) for every `raise ValueError(...)` and the like in `files`."""
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else None
            if name in BARE:
                near = lines[max(node.lineno - 2, 0) : node.lineno]  # the line above and the raise line
                found.append((str(path.relative_to(root)), node.lineno, name, any(MARK in ln for ln in near)))
    return sorted(found)


@pytest.mark.parametrize("package", packages())
def test_no_bare_builtin_raise(package):
    """Every package of src/truedepth, apps/compress included."""
    files = [p for p in source_files() if str(p.parent.relative_to(SRC)) == package]
    bad = [f"{f}:{line}: raise {name}" for f, line, name, allowed in bare_raises(files) if not allowed]
    assert not bad, (
        "raise UserError or a subclass (truedepth.utils.errors: InputPathError, OutputPathError, "
        "MissingAssetError, MeasurementError; PlanError, TPError, GGUFExportError, ...) for what a user "
        f"can cause; a true programming error keeps its type and gets a '{MARK} <why>' comment:\n  " + "\n  ".join(bad)
    )


def test_programming_errors_are_few_and_explained():
    allowed = [(f, line) for f, line, _, ok in bare_raises(source_files()) if ok]
    assert len(allowed) <= MAX_PROGRAMMING_ERRORS, allowed
    marked = {(f, n) for f, line in allowed for n in (line - 1, line)}  # the raise line and the one above
    stray = []
    for path in source_files():
        for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if MARK in ln:
                where = f"{path.relative_to(SRC)}:{i}"
                if not ln.split(MARK, 1)[1].strip():
                    stray.append(f"{where}: says no why")
                elif (str(path.relative_to(SRC)), i) not in marked:
                    stray.append(f"{where}: marks no bare raise (the raise became a UserError? drop the comment)")
    assert not stray, stray


def test_the_scan_sees_what_it_must(tmp_path):
    """The scanner itself: a bare raise is found, the comment (on the line or above) allows it."""
    code = (
        "def f(x):\n    if x:\n        raise ValueError('a')\n    # programming error: never None\n"
        "    raise RuntimeError\n\ndef g():\n    raise builtins.KeyError('k')  # programming error: test\n"
    )
    (tmp_path / "m.py").write_text(code)
    assert bare_raises([tmp_path / "m.py"], tmp_path) == [
        ("m.py", 3, "ValueError", False),
        ("m.py", 5, "RuntimeError", True),
        ("m.py", 8, "KeyError", True),
    ]


# ---- the CLI: a UserError is one line and exit 2; anything else keeps its traceback -------------
def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    from truedepth.cli import plan as plan_cmd

    def user_mistake(args):
        raise InputPathError("--model ./nope: does not exist; pass a model folder.\nsecond line")

    monkeypatch.setattr(plan_cmd, "run", user_mistake)
    code = main(["plan", "base", "--layers", "4"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines() == [
        "truedepth plan: error: --model ./nope: does not exist; pass a model folder. (more with --debug)"
    ], err


def test_a_value_error_raised_inside_truedepth_is_a_bug(monkeypatch):
    """Before issue 29 a ValueError whose traceback ended in truedepth's own files counted as the user's
    fault. Now only UserError does: a programming error keeps its type and its traceback."""
    from truedepth.apps.sweep.points import default_start
    from truedepth.cli import plan as plan_cmd

    monkeypatch.setattr(plan_cmd, "run", lambda args: default_start("no such rule", 2, 8))
    with pytest.raises(ValueError, match="unknown start rule") as err:
        main(["plan", "base", "--layers", "4"])
    assert not isinstance(err.value, UserError)


def test_a_runtime_error_raised_inside_truedepth_is_a_bug(monkeypatch):
    import torch

    from truedepth.cli import plan as plan_cmd
    from truedepth.measure.bench.decode import _checked

    monkeypatch.setattr(plan_cmd, "run", lambda args: _checked(lambda ids, n: ids, torch.zeros(1, 2), 3))
    with pytest.raises(RuntimeError, match="new tokens instead of 3"):
        main(["plan", "base", "--layers", "4"])


def test_a_bug_exits_1_with_its_traceback_on_stderr():
    """The same through the `truedepth` entry point in a fresh interpreter: exit code 1, traceback."""
    script = (
        "import sys\n"
        "from truedepth.apps.sweep.points import default_start\n"
        "import truedepth.cli.plan as plan\n"
        "from truedepth.cli.main import main\n"
        "plan.run = lambda args: default_start('no such rule', 2, 8)\n"
        "sys.exit(main(['plan', 'base', '--layers', '4']))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Traceback (most recent call last)" in res.stderr and f'File "{SRC}' in res.stderr, (
        res.stderr
    )  # raised in truedepth
    assert res.stderr.strip().splitlines()[-1] == "ValueError: unknown start rule 'no such rule'", res.stderr
