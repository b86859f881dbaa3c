"""Stream documents and pairs out of local files: text, directories, globs, JSONL, Parquet, TSV.

Everything is a generator that holds one document (one file, one record, one Parquet
record batch) at a time, so a corpus of any size streams in bounded memory. A text-like
file is one document; a JSONL line or a Parquet row is one document. `.gz`, `.bz2` and
`.xz` files are read through their decompressor.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .tex .html .htm .xml .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts "
    ".sh .css .toml .yaml .yml .cfg .ini .csv".split()
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def expand(spec: str | os.PathLike) -> list[Path]:
    """An existing file or directory as itself, a glob pattern (`**` recursive) as its sorted matches.

    Raises:
        FileNotFoundError: the path does not exist, or the pattern matches nothing.
    """
    path = Path(spec)
    if path.exists():
        return [path]
    if glob.has_magic(str(spec)):
        matches = sorted(Path(p) for p in glob.glob(str(spec), recursive=True))
        if not matches:
            raise FileNotFoundError(f"the pattern {str(spec)!r} matches no file")
        return matches
    raise FileNotFoundError(f"{str(spec)!r} does not exist")


def iter_path_documents(
    path: Path, fields: Sequence[str] | None = None, column: str | None = None
) -> Iterator[str]:
    """Documents of one file or (recursively, in sorted order) of a directory's data files.

    In a directory, hidden entries are skipped, as are files that are neither text-like
    (`TEXT_SUFFIXES`), JSONL nor Parquet, and text files that are not UTF-8 (with a warning).

    Args:
        path: a file or directory.
        fields: the JSONL keys to read (default `["text"]`); each non-empty one is a document.
        column: the Parquet column to read (default "text").
    """
    path = Path(path)
    if not path.is_dir():
        yield from _file_documents(path, fields, column, explicit=True)
        return
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield from _file_documents(Path(folder) / name, fields, column, explicit=False)


def iter_jsonl(path: Path, fields: Sequence[str] = ("text",)) -> Iterator[str]:
    """The non-empty string values of `fields` in each record of a JSONL file.

    Raises:
        ValueError: a line is not a JSON object, or a record lacks one of `fields`, or
            holds something other than a string there (the message names the line).
    """
    for lineno, record in _records(path):
        for field in fields:
            if field not in record:
                raise ValueError(
                    f"{path}:{lineno}: the record has no field {field!r} (fields: {', '.join(sorted(record))}); "
                    "choose the text field with field=... (`--field` on the command line)"
                )
            value = record[field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} holds {type(value).__name__}, expected text")
            if value:
                yield value


def iter_parquet(path: Path, column: str = "text", batch_size: int = 1024) -> Iterator[str]:
    """The non-null values of a Parquet file's string column, read one record batch at a time.

    Raises:
        ValueError: the file has no such column (the message lists the columns).
    """
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if column not in names:
        raise ValueError(
            f"{path} has no column {column!r} (columns: {', '.join(names)}); "
            "choose one with column=... (`--column` on the command line)"
        )
    for batch in parquet.iter_batches(batch_size=batch_size, columns=[column]):
        for value in batch.column(0).to_pylist():
            if value:
                yield value


def iter_pairs_file(path: Path) -> Iterator[tuple[str, str]]:
    """(input, output) pairs of a JSONL file ("source"/"target" or "text"/"label") or a two-column TSV.

    Labels are returned as text (`1` -> "1"), so every pair has the same type.

    Raises:
        ValueError: a record has neither key pair, or a TSV line has not exactly 2 columns,
            or the file is neither JSONL nor TSV.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix in JSONL_SUFFIXES:
        for lineno, record in _records(path):
            for first, second in (("source", "target"), ("text", "label")):
                if first in record and second in record:
                    yield str(record[first]), str(record[second])
                    break
            else:
                raise ValueError(
                    f"{path}:{lineno}: a pair needs the keys source/target or text/label, the record has "
                    f"{', '.join(sorted(record)) or 'none'}"
                )
    elif suffix == ".tsv":
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                columns = line.split("\t")
                if len(columns) != 2:
                    raise ValueError(f"{path}:{lineno}: expected 2 tab-separated columns, found {len(columns)}")
                yield columns[0], columns[1]
    else:
        raise ValueError(f"{path}: pairs are read from .jsonl (source/target or text/label) or .tsv files")


def _file_documents(
    path: Path, fields: Sequence[str] | None, column: str | None, explicit: bool
) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix in JSONL_SUFFIXES:
        yield from iter_jsonl(path, fields or ("text",))
    elif suffix == ".parquet":
        yield from iter_parquet(path, column or "text")
    elif suffix in TEXT_SUFFIXES or explicit:
        try:
            with _open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as err:
            if explicit:
                raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
            warnings.warn(f"skipping {path}: not UTF-8 text", stacklevel=2)
            return
        if text.strip():
            yield text


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
            yield lineno, record


def _suffix(path: Path) -> str:
    """The data suffix, under any compression suffix: `a.jsonl.gz` -> ".jsonl"."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path) -> IO[str]:
    opener = _OPENERS.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8")
