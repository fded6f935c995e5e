"""The README's command-line examples, and which test file runs each.

A command too slow for the test suite as written carries a comment naming the test file that runs
it and the variant it runs: `# tests/test_readme.py runs: truedepth demo --quick`. A file other
than test_readme.py runs its command with its own assertions (e.g. on the JSON the command writes).
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
VARIANT = re.compile(r"tests/(test_\w+\.py) runs:\s*(truedepth .+)$")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def runs() -> list[tuple[str, str]]:
    """(test file that runs it, command as written or as its variant) for each of the README's `truedepth` lines."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            if not line.startswith("truedepth "):
                continue  # `make demo` / `make test`: CI runs them
            variant = VARIANT.search(line)
            file, command = variant.groups() if variant else ("test_readme.py", line.split("  #")[0])
            found.append((file, command.strip()))
    return found


def commands(runner: str = "test_readme.py") -> list[str]:
    """The README's `truedepth` commands that the test file `runner` runs."""
    return [command for file, command in runs() if file == runner]
