"""The docs stay navigable: every link in README.md and docs/ resolves (anchors included), every
`docs/...` path named in the docs, src/, scripts/, tests/ or the Makefile exists, every file under
docs/ is referenced from somewhere other than itself, and every `truedepth.x.y` name (or
`apps.x.y`, `core.x.y`, ... in backticks) the docs give exists in src/truedepth; the guides in
docs/ stay under 200 lines (logs go to docs/research/). Pure file reading.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "truedepth"
PACKAGES = ("apps", "cli", "core", "deploy", "measure", "runtime", "utils")

LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*[\w/]")
DOTTED = re.compile(r"(?<![\w.])truedepth(?:\.[A-Za-z_]\w*)+")
RELATIVE_DOTTED = re.compile(rf"(?<![\w./])(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FROM_IMPORT = re.compile(r"from (truedepth(?:\.\w+)*) import ((?:\w+(?: as \w+)?, )*\w+(?: as \w+)?)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def code_files() -> list[Path]:
    """Text files outside docs/ that may name docs/ paths (default outputs, comments, help texts)."""
    files = [ROOT / "Makefile"]
    for folder, patterns in (
        (ROOT / "src", ("*.py",)),
        (ROOT / "scripts", ("*.py", "*.sh")),
        (ROOT / "tests", ("*.py",)),
        (DOCS, ("*.py",)),
    ):
        for pattern in patterns:
            files += sorted(folder.rglob(pattern))
    return [f for f in files if f.is_file() and f != Path(__file__).resolve()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return "".join(c for c in heading.lstrip("#").strip().lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(line) for line in md.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def references() -> tuple[dict[Path, set[Path]], list[str]]:
    """(file or folder -> the files that reference it, problems found on the way)."""
    refs: dict[Path, set[Path]] = {}
    problems = []
    for md in markdown_files():
        text = md.read_text()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            path = (md.parent / path_part).resolve() if path_part else md
            if not path.exists():
                problems.append(f"{rel(md)}: link to {target}: no such file")
                continue
            refs.setdefault(path, set()).add(md)
            if anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{rel(md)}: link to {target}: no heading with that anchor in {rel(path)}")
    for source in markdown_files() + code_files():
        for name in DOCS_PATH.findall(source.read_text()):
            path = (ROOT / name).resolve()
            if not path.exists():
                problems.append(f"{rel(source)}: names {name}, which does not exist")
            refs.setdefault(path, set()).add(source)
    return refs, problems


def test_every_link_and_docs_path_exists():
    _, problems = references()
    assert not problems, "\n".join(problems)


def test_every_file_under_docs_is_referenced():
    refs, _ = references()
    orphans = [rel(f) for f in sorted(DOCS.rglob("*")) if f.is_file() and not refs.get(f.resolve(), set()) - {f}]
    assert not orphans, (
        "referenced by no link and no docs/ path in README.md, docs/, src/, scripts/, tests/ or "
        "the Makefile: link each where it belongs, or remove it:\n" + "\n".join(orphans)
    )


def test_the_guides_stay_short():
    """A guide says what a command does and how to run it, with the headline numbers; dated
    experiment logs go to docs/research/ (issue 29: COMPRESS.md had grown to 690 lines)."""
    long = [
        f"{rel(md)}: {n} lines" for md in sorted(DOCS.glob("*.md")) if (n := len(md.read_text().splitlines())) > 200
    ]
    assert not long, "move the experiment logs to docs/research/:\n" + "\n".join(long)


def module_file(parts: list[str]) -> Path | None:
    path = SRC.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(module: Path, name: str) -> bool:
    text = module.read_text()
    return bool(
        re.search(
            rf"^(?:def|class|async def) {name}\b|^{name}\s*[:=]|^\s*(?:from\s+\S+\s+)?import\b.*\b{name}\b"
            rf"|^\s+{name},?\s*$|^\s+{name}, ",
            text,
            flags=re.M,
        )
    )


def dotted_problem(name: str) -> str | None:
    parts = name.split(".")[1:]
    for k in range(len(parts), -1, -1):
        module = module_file(parts[:k])
        if module is None:
            continue
        rest = parts[k:]
        if not rest:
            return None
        if not defines(module, rest[0]):
            return f"{rel(module)} defines no {rest[0]}"
        if any(not re.search(rf"\b{attr}\b", module.read_text()) for attr in rest[1:]):
            return f"{rel(module)} has no {'.'.join(rest)}"
        return None
    return "no such module"


def test_every_dotted_name_in_the_docs_exists():
    problems = []
    for md in markdown_files():
        text = md.read_text()
        names = set(DOTTED.findall(text))
        for module, imported in FROM_IMPORT.findall(text):
            names |= {f"{module}.{item.split(' as ')[0]}" for item in imported.split(", ")}
        for span in CODE_SPAN.findall(text):
            names |= {"truedepth." + n for n in RELATIVE_DOTTED.findall(span)}
        for name in sorted(names):
            problem = dotted_problem(name)
            if problem:
                problems.append(f"{rel(md)}: {name}: {problem}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for():
    """The three stale references that issue 29 found would fail these checks."""
    assert dotted_problem("truedepth.apps.finetune.train.plot_recovery")
    assert dotted_problem("truedepth.data.held_out_text")
    assert dotted_problem("truedepth.apps.finetune.report.plot_recovery") is None
    assert dotted_problem("truedepth.measure.eval.data.held_out_text") is None
    assert FROM_IMPORT.findall("from truedepth.apps.finetune.train import plot_recovery as p; p([])") == [
        ("truedepth.apps.finetune.train", "plot_recovery as p")
    ]
    assert slug("## Not done (issue 15)") == "not-done-issue-15"
    assert (
        slug("## Training on the novels: today's default (`--data austen-train+fortunes`)")
        == "training-on-the-novels-todays-default---data-austen-trainfortunes"
    )
