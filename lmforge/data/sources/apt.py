"""Sources from Debian's archive: the Python documentation and translated package descriptions.

- `python3.11-doc` ships the reStructuredText sources of the docs as
  `usr/share/doc/python3.11/html/_sources/**/*.rst.txt`; one document per file.
- The `Translation-<lang>` index files hold one stanza per package description:

      Package: 0ad
      Description-md5: d943033bedada21853d2ae54a2578a7b
      Description-de: <synopsis, one line>
       <long description, each line indented by one space; " ." separates paragraphs,
       lines indented by two or more spaces are shown verbatim>

  `Description-md5` is the md5 of the English original, so it aligns a translation with
  its English text; paragraphs are paired only when both sides have the same number.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.fetch import MARKER, fetch_apt_translations, fetch_deb
from lmforge.data.sources import Source, clean, marker_checksum

DOCS_PACKAGE = "python3.11-doc"
LANGUAGES = ("de", "en", "fr")  # fetched together: one cache entry serves every description corpus
_DESCRIPTIONS_LICENSE = (
    "each description is part of its Debian package and shares its DFSG-free license; translations by "
    "the Debian Description Translation Project (DDTP) contributors"
)


@dataclass(frozen=True)
class Description:
    """One stanza of a Translation-<lang> file."""

    package: str
    md5: str
    synopsis: str
    paragraphs: tuple[str, ...]


def python_docs(cache_dir: Path, force: bool = False) -> Source:
    """The Python documentation's reStructuredText sources, one document per page."""
    root = fetch_deb(DOCS_PACKAGE, cache_dir=cache_dir, force=force)
    found = sorted(root.glob("usr/share/doc/*/html/_sources"))
    if not found:
        raise RuntimeError(f"{root} (from {DOCS_PACKAGE}) holds no usr/share/doc/*/html/_sources folder")

    def records() -> Iterator[dict]:
        for path in sorted(found[0].rglob("*.txt")):
            text = clean(path.read_text(encoding="utf-8", errors="replace"))
            if text:
                yield {"text": text, "origin": "python-docs", "id": str(path.relative_to(found[0]))}

    version = root.name.split("_", 1)[1].replace("%3a", ":")
    return Source(
        name="python-docs",
        title=f"Python {DOCS_PACKAGE[6:10]} documentation, reStructuredText sources",
        license="PSF-2.0 (Python Software Foundation License Version 2); code examples 0BSD",
        attribution="Python Software Foundation and the Python documentation authors; Debian package "
        f"{DOCS_PACKAGE} {version}",
        how=f"apt-get download {DOCS_PACKAGE}={version} && dpkg-deb -x",
        records=records,
        checksum=marker_checksum(root),
        license_files=tuple(root.glob(f"usr/share/doc/{DOCS_PACKAGE}/copyright")),
    )


def debian_translations(lang: str, cache_dir: Path, force: bool = False) -> Source:
    """English -> `lang` pairs: package synopses and long-description paragraphs, aligned by md5."""
    root = fetch_apt_translations(LANGUAGES, cache_dir=cache_dir, force=force)

    def records() -> Iterator[dict]:
        translated = {d.md5: d for path in _index_files(root, lang) for d in read_translation(path)}
        for path in _index_files(root, "en"):
            for en in read_translation(path):
                other = translated.get(en.md5)
                if other is None:
                    continue
                pairs = [(en.synopsis, other.synopsis)]
                if len(en.paragraphs) == len(other.paragraphs):
                    pairs += zip(en.paragraphs, other.paragraphs)
                for source, target in pairs:
                    if source and target and source != target:
                        yield {"source": source, "target": target, "origin": "debian"}

    return Source(
        name=f"debian-descriptions-{lang}",
        title=f"Debian package descriptions, English and their human translations into {lang!r}",
        license=_DESCRIPTIONS_LICENSE,
        attribution="Debian package maintainers and DDTP translators (https://ddtp.debian.org)",
        how=_apt_how(root),
        records=records,
        checksum=_checksums(root, ("en", lang)),
    )


def debian_summaries(cache_dir: Path, force: bool = False) -> Source:
    """Long package description (paragraphs joined by blank lines) -> its one-line synopsis."""
    root = fetch_apt_translations(LANGUAGES, cache_dir=cache_dir, force=force)

    def records() -> Iterator[dict]:
        for path in _index_files(root, "en"):
            for d in read_translation(path):
                if d.paragraphs and d.synopsis:
                    yield {"source": "\n\n".join(d.paragraphs), "target": d.synopsis, "origin": "debian"}

    return Source(
        name="debian-descriptions-en",
        title="Debian package descriptions (English): long description and one-line synopsis",
        license=_DESCRIPTIONS_LICENSE,
        attribution="Debian package maintainers (https://www.debian.org/distrib/packages)",
        how=_apt_how(root),
        records=records,
        checksum=_checksums(root, ("en",)),
    )


def read_translation(path: Path) -> Iterator[Description]:
    """Stream the stanzas of a Translation-<lang> file (deb822 format, see the module docstring).

    A stanza without `Description-md5` or `Description-<lang>` is not a description: skipped.
    """
    fields: dict[str, list[str]] = {}
    current = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in itertools.chain(f, ["\n"]):  # a final blank line ends the last stanza
            line = line.rstrip("\n")
            if not line.strip(" \t"):  # deb822 blank line (str.strip() would also eat e.g. U+00A0)
                text = next((v for k, v in fields.items() if k.startswith("Description-") and k[12:] != "md5"), None)
                if text is not None and "Description-md5" in fields:
                    package = fields.get("Package", [""])[0]
                    yield Description(package, fields["Description-md5"][0], text[0], _paragraphs(text[1:]))
                fields, current = {}, None
            elif line[0] in " \t" and current is not None:
                fields[current].append(line)
            else:
                current, _, value = line.partition(":")
                fields[current] = [value.strip()]


def _paragraphs(lines: list[str]) -> tuple[str, ...]:
    """Continuation lines -> paragraphs: wrapped lines are joined, verbatim ones keep their breaks."""
    paragraphs, current = [], []
    for line in [*lines, " ."]:
        body = line[1:]  # every continuation line starts with one space
        if body.strip(" \t") != ".":
            current.append(body.rstrip())
            continue
        if any(part.startswith((" ", "\t")) for part in current):
            text = textwrap.dedent("\n".join(current)).strip("\n")
        else:
            text = " ".join(part.strip() for part in current if part.strip())
        if text:
            paragraphs.append(text)
        current = []
    return tuple(paragraphs)


def _index_files(root: Path, lang: str) -> list[Path]:
    return sorted(root.glob(f"*_i18n_Translation-{lang}"))


def _checksums(root: Path, langs: tuple[str, ...]) -> str:
    wanted = {p.name for lang in langs for p in _index_files(root, lang)}
    return "; ".join(line for line in (root / MARKER).read_text().splitlines() if line.split()[-1] in wanted)


def _apt_how(root: Path) -> str:
    """The fetch command plus the signed releases the files come from (origin, codename, date)."""
    releases = []
    for path in sorted(root.glob("*InRelease")):
        head = dict(
            line.split(": ", 1) for line in path.read_text(errors="replace").splitlines()[:12] if ": " in line
        )
        releases.append(f"{head.get('Origin', '?')} {head.get('Codename', head.get('Suite', '?'))} "
                        f"({head.get('Date', 'undated')})")
    return (
        "apt-get -c <private apt.conf> update, with the machine's sources, a private lists folder and "
        f"Acquire::Languages {{{', '.join(LANGUAGES)}}}; releases: " + "; ".join(releases or ["unknown"])
    )
