"""Documents -> token shards on disk (`prepare`), and shards -> token arrays (`TokenShards`).

`prepare` streams documents in batches (memory is bounded by the batch, the set of 16-byte
digests used to drop duplicates, and nothing else), tokenizes each batch with the Rust engine
(which spreads a batch over all cores), appends EOS after every document and writes the splits
with the format of `shard_io`. Train/val membership is a function of the document text alone, so
it does not depend on input order or batch size, and the same inputs give byte-identical files.
`pair_shards` builds seq2seq and classification pairs from the same pieces.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from lmforge.data.shard_io import OFFSET_DTYPE, SPLITS, ShardFolder, open_array, read_index, token_dtype
from lmforge.tokenizer import Tokenizer

T = TypeVar("T")
DEFAULT_SHARD_TOKENS = 2**24  # 32 MiB per uint16 shard: few files, each cheap to checksum
SPLIT_RULE = ("blake2b-128 of the UTF-8 text salted with the seed; duplicates share it and are dropped; "
              "a document is in val when its first 8 digest bytes (little-endian) / 2**64 < val_fraction")


def digest(data: bytes, seed: int = 0) -> bytes:
    """16-byte content hash of a UTF-8 document: the key for deduplication and the train/val split."""
    return hashlib.blake2b(data, digest_size=16, salt=seed.to_bytes(16, "little")).digest()


def in_val(doc_digest: bytes, val_fraction: float) -> bool:
    return int.from_bytes(doc_digest[:8], "little") < val_fraction * 2**64


def prepare_documents(docs: Iterable[str], tokenizer: Tokenizer, out: str | Path, *, val_fraction: float = 0.01,
                      shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0, batch_docs: int = 256,
                      batch_chars: int = 2**23, inputs: Any = None, progress: bool | None = None) -> Path:
    """Tokenize `docs` into train/val token shards in folder `out` (see `shard_io` for the format).

    Args:
        docs: the documents, streamed once; empty ones are skipped, exact duplicates dropped.
        tokenizer: its `encode_batch` tokenizes, its `eos_id` (if any) ends every document.
        out: output folder, created if needed; files of an earlier prepare there are replaced.
        val_fraction: expected fraction of documents in the val split, chosen by content hash.
        shard_tokens: tokens per shard file (the last one of a split may hold fewer).
        seed: salts the content hash, i.e. picks a different (still deterministic) val split.
        batch_docs: documents tokenized per call (with batch_chars, bounds memory).
        batch_chars: a batch ends once its documents hold this many characters.
        inputs: a JSON-able description of where the documents came from, kept in the index.
        progress: show a progress bar; None shows it when stderr is a terminal.

    Returns:
        `out`, now holding the shards and `index.json`.
    """
    check_settings(val_fraction, seed)
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    seen: set[bytes] = set()
    counts = {"documents_seen": 0, "bytes_read": 0, "duplicates_removed": 0, "empty_removed": 0}
    with ShardFolder(Path(out), SPLITS, dtype, shard_tokens) as folder, progress_bar(out, progress) as bar:
        for batch in batches(docs, batch_docs, batch_chars, len):
            texts, val = [], []
            for text in batch:
                data = text.encode("utf-8", "surrogatepass")
                counts["bytes_read"] += len(data)
                key = digest(data, seed) if data else None
                if key is None:
                    counts["empty_removed"] += 1
                elif key in seen:
                    counts["duplicates_removed"] += 1
                else:
                    seen.add(key)
                    texts.append(text)
                    val.append(in_val(key, val_fraction))
            counts["documents_seen"] += len(batch)
            ids = tokenizer.encode_batch(texts) if texts else []
            for split, want_val in (("train", False), ("val", True)):
                chosen = [x for x, v in zip(ids, val) if v == want_val]
                if chosen:
                    folder.writers[split].add(*pack(chosen, eos, dtype))
            bar.update(len(batch))
        splits = folder.close_splits()
        kept = sum(e["n_documents"] for e in splits.values())
        settings = {"val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "split": SPLIT_RULE}
        return folder.finish(index_fields("documents", tokenizer, dtype, inputs, settings,
                                          {**counts, "documents_kept": kept}, splits))


def prepare(inputs: list[str], tokenizer: Tokenizer, out: str | Path, val_fraction: float = 0.01,
            field: str | None = None, column: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, *,
            seed: int = 0, progress: bool | None = None) -> Path:
    """Token shards from corpus names, text files, folders, globs, JSONL (`field`) or Parquet (`column`).

    The inputs are read in order through `lmforge.data.corpora.iter_documents`; the rest is
    `prepare_documents`.
    """
    from lmforge.data.corpora import iter_documents

    if not inputs:
        raise ValueError("no inputs: pass corpus names, text files, folders, globs, .jsonl or .parquet files")

    def docs() -> Iterator[str]:
        for spec in inputs:
            yield from iter_documents(spec, field=field, column=column)

    description = {"inputs": list(inputs), "field": field, "column": column}
    return prepare_documents(docs(), tokenizer, out, val_fraction=val_fraction, shard_tokens=shard_tokens,
                             seed=seed, inputs=description, progress=progress)


def check_settings(val_fraction: float, seed: int) -> None:
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if seed < 0 or seed >= 2**128:
        raise ValueError(f"seed must be in [0, 2**128), got {seed}")


def progress_bar(out: str | Path, progress: bool | None, unit: str = " docs") -> tqdm:
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(desc=f"prepare {Path(out).name}", unit=unit, disable=not show, dynamic_ncols=True)


def index_fields(kind: str, tokenizer: Tokenizer, dtype: np.dtype, inputs: Any, settings: dict[str, Any],
                 counts: dict[str, int], splits: dict[str, Any]) -> dict[str, Any]:
    """The index of a prepared folder, less format and version (`ShardFolder.finish` adds them)."""
    return {
        "kind": kind,
        "dtype": dtype.name,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id},
        "inputs": inputs,
        "settings": settings,
        "counts": counts,
        "splits": splits,
    }


def batches(items: Iterable[T], batch_items: int, batch_chars: int, size: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive lists of `items`, each ending once it holds `batch_items` items or `batch_chars` of `size`."""
    batch: list[T] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += size(item)
        if len(batch) >= batch_items or chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack(ids: list[list[int]], eos: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents' ids (each followed by EOS) -> (tokens, per-document lengths)."""
    if eos is not None:
        for x in ids:
            x.append(eos)
    lengths = np.fromiter(map(len, ids), np.uint64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    return tokens, lengths


class TokenShards:
    """One split of a prepared folder: its shards memory-mapped read-only, validated on open.

    Opening checks the index (present, known version), every file's size against its token count
    (a truncated shard), every file's sha256 (`verify=True`; False skips this full read) and, when
    `tokenizer` is given, that the shards were made with it. Any mismatch is a ValueError naming
    the file, what was expected, what was found and how to rebuild.

    Attributes: `n_tokens`, `n_documents`, `dtype`, `vocab_size`, `eos_id`, `shards` (one memmap
    per file), `documents` (uint64 offsets, `n_documents + 1` of them: document i is
    `tokens(documents[i], documents[i+1] - documents[i])`, its EOS included).
    """

    def __init__(self, folder: str | Path, split: str = "train", tokenizer: Tokenizer | None = None,
                 verify: bool = True) -> None:
        self.folder = Path(folder)
        self.split = split
        self.index = index = read_index(self.folder)
        entry = index["splits"].get(split)
        if entry is None:
            kind = index.get("kind", "documents")
            hint = f" (it holds {kind} pairs: read them with lmforge.data.pair_shards.PairShards)"
            raise ValueError(f"{self.folder} has no split {split!r}; it has {sorted(index['splits'])}"
                             f"{hint if kind != 'documents' else ''}")
        if index["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"{self.folder / 'index.json'}: unknown token dtype {index['dtype']!r}; "
                             f"{self.rebuild_hint}")
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size: int = index["tokenizer"]["vocab_size"]
        self.eos_id: int | None = index["tokenizer"]["eos_id"]
        self.fingerprint: str = index["tokenizer"]["fingerprint"]
        if tokenizer is not None and tokenizer.fingerprint != self.fingerprint:
            raise ValueError(
                f"{self.folder} was prepared with another tokenizer: expected fingerprint {self.fingerprint[:16]}... "
                f"(vocab {self.vocab_size}), the given tokenizer has {tokenizer.fingerprint[:16]}... (vocab "
                f"{tokenizer.vocab_size}); pass the tokenizer the shards were made with, or {self.rebuild_hint} "
                "with this one"
            )
        self.n_tokens: int = entry["n_tokens"]
        self.n_documents: int = entry["n_documents"]
        self.shards = [self._open(s["file"], s["n_tokens"], self.dtype, s["sha256"], verify) for s in entry["shards"]]
        docs = entry["documents"]
        self.documents = self._open(docs["file"], self.n_documents + 1, OFFSET_DTYPE, docs["sha256"], verify)
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])  # first token of each shard
        found = (int(self._starts[-1]), int(self.documents[0]), int(self.documents[-1]))
        if found != (self.n_tokens, 0, self.n_tokens) or (verify and np.any(self.documents[1:] < self.documents[:-1])):
            raise ValueError(f"{self.folder} split {split!r}: the index says {self.n_tokens} tokens but shards "
                             f"and document offsets disagree (shards {found[0]}, offsets {found[1]}..{found[2]}, "
                             f"or offsets not increasing); {self.rebuild_hint}")

    @property
    def rebuild_hint(self) -> str:
        """How to rebuild the folder: the `lmforge data prepare` command line that made it."""
        source = self.index.get("inputs")
        specs = source.get("inputs") if isinstance(source, dict) else source  # prepare's, or prepare_documents'
        args = " ".join(map(str, specs)) if isinstance(specs, list) and specs else "INPUT..."
        if isinstance(source, dict):
            args = "".join(f"--{k} {source[k]} " for k in ("pairs", "field", "column") if source.get(k)) + args
        return f"re-run `lmforge data prepare --tokenizer DIR --out {self.folder} {args}` to rebuild it"

    def _open(self, name: str, n: int, dtype: np.dtype, sha256: str, verify: bool) -> np.ndarray:
        return open_array(self.folder / name, n, dtype, sha256, verify, self.rebuild_hint)

    def tokens(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the split's stream from `start`, across shard boundaries (read-only view
        when they lie in one shard, a copy otherwise)."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range: split {self.split!r} has "
                             f"{self.n_tokens} tokens")
        end = start + length
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while start < end:
            offset = int(self._starts[i])
            stop = min(end, offset + len(self.shards[i]))
            parts.append(self.shards[i][start - offset : stop - offset])
            start, i = stop, i + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i` (0 <= i < n_documents) without the EOS that ends it."""
        if not 0 <= i < self.n_documents:
            raise IndexError(f"document {i} out of range: split {self.split!r} has {self.n_documents} documents")
        start, end = int(self.documents[i]), int(self.documents[i + 1])
        return self.tokens(start, end - start - (self.eos_id is not None))

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.folder)!r}, split={self.split!r}: {self.n_tokens:,} tokens, "
                f"{self.n_documents:,} documents, {len(self.shards)} shards of {self.dtype.name})")
