"""Every Python and command-line example in README.md runs, as written, so the README cannot rot.

```python blocks run as scripts; in ```bash blocks every line that starts with `truedepth ` runs as
`python -m truedepth ...` (`make ...` lines are what CI runs and are skipped). A command too slow
for the test suite carries a visible comment in the README naming the variant the test runs:
`# ... tests/test_readme.py runs: truedepth demo --quick`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
VARIANT = re.compile(r"tests/test_readme\.py runs:\s*(truedepth .+)$")
pytestmark = pytest.mark.integration


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands() -> list[str]:
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            if not line.startswith("truedepth "):
                continue  # `make demo` / `make test`: CI runs them
            variant = VARIANT.search(line)
            found.append(variant.group(1).strip() if variant else line.split("  #")[0].strip())
    return found


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(README.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_examples():
    assert blocks("python") and len(commands()) >= 4


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
