"""Every Python and command-line example in README.md runs, as written, so the README cannot rot.

```python blocks run as scripts; in ```bash blocks every line that starts with `truedepth ` runs as
`python -m truedepth ...` (`make ...` lines are what CI runs and are skipped). A command too slow
for the test suite carries a visible comment in the README naming the variant the test runs:
`# ... tests/test_readme.py runs: truedepth demo --quick`; one that names another test file is run
there, with assertions on what it writes (tests/helpers/readme.py).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.readme import README, blocks, commands, runs

pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(README.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_examples():
    assert blocks("python") and len(commands()) >= 4


def test_every_command_that_names_another_test_file_is_run_there():
    """A README variant naming a test file that does not run it would leave the example untested."""
    named = {file for file, _ in runs()}
    assert len(named) > 1, "no README command names another test file"
    for file in named - {"test_readme.py"}:
        source = (README.parent / "tests" / file).read_text()
        assert commands(file) and f'commands("{file}")' in source, file


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs(tmp_path, index):
    script = tmp_path / "example.py"
    script.write_text(blocks("python")[index])
    res = run([sys.executable, str(script)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("command", commands())
def test_command_line_example_runs(tmp_path, command):
    argv = shlex.split(command)
    res = run([sys.executable, "-m", "truedepth", *argv[1:]], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), "the command printed nothing"


def test_plan_grammar_examples_fit_a_30_layer_model():
    """The examples in `truedepth --help` (GRAMMAR_HELP) are valid plans, like the README's."""
    from truedepth.core.plan import GRAMMAR_HELP, Plan

    line = next(ln for ln in GRAMMAR_HELP.splitlines() if ln.startswith("Examples:"))
    for example in line.removeprefix("Examples:").split():
        Plan.parse(example).blocks(30)
