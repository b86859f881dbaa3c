"""The on-disk format of token shards: file names, the token dtype, atomic writers and the index.

A prepared folder holds, per split (`train`, `val`):
- `<split>_00000.bin`, `<split>_00001.bin`, ...: the split's tokens as one flat stream of raw
  little-endian uint16 (vocabulary <= 65536) or uint32 values, cut into shards of at most
  `shard_tokens` tokens (a document may continue into the next shard);
- `<split>_docs.bin`: little-endian uint64 document offsets into that stream, one per document
  plus the stream's end, so document i is `stream[offsets[i]:offsets[i + 1]]` (its EOS included);
- `index.json`: format and version, kind, dtype, tokenizer fingerprint, per-file token counts and
  sha256, corpus counts and the inputs. It is written last, so a folder without it is unfinished.

A folder of pairs (`kind` "seq2seq" or "classification", see `pair_shards`) has the same files
under other split names: `train.source` / `train.target` hold the two sides of each pair as
aligned documents (document i of one is the partner of document i of the other); a
classification split adds `<split>_labels.bin`, one little-endian int64 label id per document,
and the index lists the label names (`labels`, id = position).
Every file is written to `NAME.tmp-HOST-PID`, fsynced and renamed, so a crash never leaves a half
file under a real name, and two writers never rename each other's temp files. A prepare holds an
exclusive `flock` on `.prepare.lock` while it writes, so a second prepare into the same folder is
refused at once instead of deleting and replacing the first one's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge._files import FileLock, LockHeld, pid_alive

FORMAT = "lmforge-token-shards"
VERSION = 1
INDEX = "index.json"
LOCK_FILE = ".prepare.lock"
SPLITS = ("train", "val")
OFFSET_DTYPE = np.dtype("<u8")
LABEL_DTYPE = np.dtype("<i8")
# every file name prepare writes (and may delete when it rewrites a folder); temp files end in
# `.tmp-HOST-PID` (`.tmp` before lmforge named the writer)
_OWN_FILE = re.compile(r"^(?:(?:train|val)(?:\.source|\.target)?_(?:\d{5}|docs|labels)\.bin|index\.json)"
                       r"(?P<tmp>\.tmp(?:-(?P<host>.*)-(?P<pid>\d+))?)?$")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size - 1) fits in 16 bits, else uint32; little-endian."""
    if vocab_size < 1 or vocab_size > 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, i: int) -> str:
    return f"{split}_{i:05d}.bin"


def offsets_name(split: str) -> str:
    return f"{split}_docs.bin"


class AtomicFile:
    """A file written to `path.tmp-HOST-PID`, hashed as it goes, and renamed to `path` on `commit()`.

    Host and pid make the temp name this writer's own, so another process writing the same `path`
    can neither rename it away nor have it deleted by `remove_own_files` while it is alive.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        self._f = open(self.tmp, "wb")  # closed in commit() / abort()
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.size += len(data)

    def commit(self) -> str:
        """Flush to disk, rename into place; returns the sha256 hex digest of the contents."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Appends one split's tokens to `<split>_00000.bin`, ... of at most `shard_tokens` tokens each,
    and its document offsets to `<split>_docs.bin`."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
        self.folder, self.split, self.dtype, self.shard_tokens = Path(folder), split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []  # finished shards: {"file", "n_tokens", "sha256"}
        self.n_tokens = 0
        self.n_documents = 0
        self._shard: AtomicFile | None = None
        self._offsets = AtomicFile(self.folder / offsets_name(split))
        self._offsets.write(np.zeros(1, OFFSET_DTYPE).tobytes())  # the first document starts at 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents: `tokens` is their concatenation, `doc_lengths` their token counts."""
        assert tokens.dtype == self.dtype and int(doc_lengths.sum()) == len(tokens)
        ends = self.n_tokens + np.cumsum(doc_lengths, dtype=np.uint64)
        self._offsets.write(ends.astype(OFFSET_DTYPE).tobytes())
        self.n_documents += len(doc_lengths)
        while len(tokens):
            if self._shard is None:
                self._shard = AtomicFile(self.folder / shard_name(self.split, len(self.shards)))
            room = self.shard_tokens - self._shard.size // self.dtype.itemsize
            self._shard.write(tokens[:room].tobytes())
            self.n_tokens += min(room, len(tokens))
            tokens = tokens[room:]
            if self._shard.size == self.shard_tokens * self.dtype.itemsize:
                self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._shard is not None
        n_tokens = self._shard.size // self.dtype.itemsize
        self.shards.append({"file": self._shard.path.name, "n_tokens": n_tokens, "sha256": self._shard.commit()})
        self._shard = None

    def close(self) -> dict[str, Any]:
        """Finish the files; returns the split's entry of the index."""
        if self._shard is not None:
            self._finish_shard()
        offsets = {"file": self._offsets.path.name, "dtype": "uint64", "sha256": self._offsets.commit()}
        return {"n_tokens": self.n_tokens, "n_documents": self.n_documents, "shards": self.shards,
                "documents": offsets}

    def abort(self) -> None:
        for f in (self._shard, self._offsets):
            if f is not None:
                f.abort()


class ShardFolder:
    """One prepare run into `out`: a `ShardWriter` per split name, small extra arrays, the index last.

    Use it as a context manager: an exception inside aborts every unfinished file, so the folder
    has no index and reads as unfinished. `finish` removes the files of an earlier prepare that
    this one did not write, then writes index.json. The folder's `PrepareLock` is held from the
    constructor to the end of the `with` block.

    Raises:
        ValueError: another prepare is writing into `out` (see `PrepareLock`).
    """

    def __init__(self, out: Path, names: Iterable[str], dtype: np.dtype, shard_tokens: int) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = PrepareLock(self.out)
        self.dtype = dtype
        self.writers: dict[str, ShardWriter] = {}
        self._files: list[AtomicFile] = []
        try:
            (self.out / INDEX).unlink(missing_ok=True)  # the folder is unfinished until the new index is written
            for name in names:
                self.writers[name] = ShardWriter(self.out, name, dtype, shard_tokens)
        except BaseException:
            self._abort()
            raise

    def __enter__(self) -> ShardFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
        self._lock.release()

    def _abort(self) -> None:
        """Delete every unfinished file and release the lock."""
        for writer in self.writers.values():
            writer.abort()
        for f in self._files:
            f.abort()
        self._lock.release()

    def close_splits(self) -> dict[str, dict[str, Any]]:
        """Finish every split's files; returns the index entry of each."""
        return {name: writer.close() for name, writer in self.writers.items()}

    def write_array(self, name: str, array: np.ndarray) -> dict[str, Any]:
        """Write `array`'s raw bytes as file `name`; returns its index entry {"file", "dtype", "sha256"}."""
        f = AtomicFile(self.out / name)
        self._files.append(f)
        f.write(array.tobytes())
        return {"file": name, "dtype": array.dtype.name, "sha256": f.commit()}

    def finish(self, index: dict[str, Any]) -> Path:
        """Write index.json (format and version added) over `index`, whose "splits" list every file."""
        keep = set()
        for entry in index["splits"].values():
            keep |= {s["file"] for s in entry["shards"]} | {entry["documents"]["file"]}
            keep |= {entry["labels"]["file"]} if "labels" in entry else set()
        remove_own_files(self.out, keep)
        write_index(self.out, {"format": FORMAT, "version": VERSION, **index})
        return self.out


def open_array(path: Path, n: int, dtype: np.dtype, sha256: str, verify: bool, fix: str) -> np.ndarray:
    """File `path` as a read-only memmap of `n` values, after checking its size and (`verify`) sha256.

    Raises FileNotFoundError / ValueError naming the file, what the index expects, what was found,
    and `fix` (how to rebuild).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (listed in {path.parent / INDEX}); {fix}")
    expected, size = n * dtype.itemsize, path.stat().st_size
    if size != expected:
        raise ValueError(f"{path} is {size} bytes, expected {expected} ({n} values of {dtype.name}): the file "
                         f"is truncated or was overwritten; {fix}")
    if verify and (found := sha256_file(path)) != sha256:
        raise ValueError(f"{path} has sha256 {found}, expected {sha256} ({INDEX}): the file is corrupted "
                         f"or was changed; {fix}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)


class PrepareLock(FileLock):
    """The folder's `.prepare.lock` (`lmforge._files.FileLock`), held while one prepare writes there: two
    prepares into one folder would replace and delete each other's files, so the second is refused at
    once with the holder's pid and host."""

    def __init__(self, folder: Path) -> None:
        try:
            super().__init__(Path(folder) / LOCK_FILE)
        except LockHeld as held:
            raise ValueError(f"{folder} is in use: {held.holder} is preparing token shards into it (lock file "
                             f"{Path(folder) / LOCK_FILE}); wait for it to finish, or pass another --out") from None


def remove_own_files(folder: Path, keep: set[str] = frozenset()) -> None:
    """Delete the shard, offset and index files a previous `prepare` left in `folder` (nothing else).

    A temp file goes only when its writer is gone: `NAME.tmp` (older lmforge), or `NAME.tmp-HOST-PID`
    of this host whose process has ended. A live writer's temp files stay, and so do another host's
    (its process cannot be checked from here): a writer the lock did not keep out never loses them.
    """
    host = socket.gethostname()
    for path in folder.iterdir():
        m = _OWN_FILE.match(path.name)
        if m is None or path.name in keep:
            continue
        if m["tmp"] is None or m["pid"] is None or (m["host"] == host and not pid_alive(int(m["pid"]))):
            path.unlink(missing_ok=True)


def write_index(folder: Path, index: dict[str, Any]) -> None:
    f = AtomicFile(folder / INDEX)
    f.write((json.dumps(index, indent=2) + "\n").encode())
    f.commit()
    fd = os.open(folder, os.O_RDONLY)  # make the renames durable too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_index(folder: Path) -> dict[str, Any]:
    """The folder's index, checked to be ours and of a version this code reads."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {folder} holds no finished token shards (missing, or `lmforge data prepare` "
            "was interrupted); run `lmforge data prepare --tokenizer DIR --out DIR INPUT...`"
        )
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run `lmforge data prepare` into {folder}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a token-shard index (expected format {FORMAT!r}, found "
                         f"{index.get('format') if isinstance(index, dict) else type(index).__name__!r})")
    if index.get("version") != VERSION:
        raise ValueError(f"{path} has format version {index.get('version')!r}, this lmforge reads version "
                         f"{VERSION}; re-run `lmforge data prepare` into {folder} with this lmforge")
    return index


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()
