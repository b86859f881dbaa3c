"""(input, output) pairs -> token shards (`prepare_pairs`), and shards -> examples (`PairShards`).

Two kinds of pairs, written with the format of `shard_io` under other split names:
- seq2seq (translation, summarisation): the source and the target of each pair become document
  i of the splits `<split>.source` and `<split>.target`, each with EOS appended;
- classification (text, label): the text becomes document i of `<split>` (EOS appended), its
  label the int64 id i of `<split>_labels.bin`; the ids index `labels` in index.json, the label
  names sorted (numerically when all are integers, so labels "0".."9" get ids 0..9).

The rules are those of `shards.prepare_documents`: a pair with an empty side is skipped, exact
duplicate pairs are dropped, and the train/val split is a function of the content alone, so input
order and batch size change nothing and a re-run writes byte-identical files. The split hashes
the source (input) side only: every pair sharing an input (one sentence, two translations; one
review, two labels) lands in the same split, so val never scores an input seen in training.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.data.shard_io import LABEL_DTYPE, SPLITS, ShardFolder, open_array, read_index, token_dtype
from lmforge.data.shards import (
    DEFAULT_SHARD_TOKENS,
    TokenShards,
    batches,
    check_settings,
    digest,
    in_val,
    index_fields,
    pack,
    progress_bar,
)
from lmforge.tokenizer import Tokenizer

PAIR_KINDS = ("seq2seq", "classification")
MAX_LABELS = 2**16  # more distinct labels than this is seq2seq data passed as classification
SPLIT_RULE = ("blake2b-128 (salted with the seed) of the length-prefixed UTF-8 source and target drops duplicate "
              "pairs; a pair is in val when the first 8 bytes (little-endian) / 2**64 of the same hash of its "
              "source alone < val_fraction")


def pair_digest(source: bytes, target: bytes, seed: int = 0) -> bytes:
    """16-byte hash of a pair; the length prefix keeps ("ab", "c") and ("a", "bc") apart."""
    return digest(len(source).to_bytes(8, "little") + source + target, seed)


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Label names in id order: numeric when every name is an integer ("2" before "10"), else by code point."""
    labels = list(labels)
    try:
        return sorted(labels, key=lambda x: (int(x), x))
    except ValueError:
        return sorted(labels)


def prepare_pairs(pairs: Iterable[tuple[str, str]], tokenizer: Tokenizer, out: str | Path, *,
                  kind: Literal["seq2seq", "classification"], val_fraction: float = 0.01,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0, batch_pairs: int = 256,
                  batch_chars: int = 2**23, inputs: Any = None, progress: bool | None = None) -> Path:
    """Tokenize (source, target) or (text, label) pairs into train/val shards in folder `out`.

    Args:
        pairs: the pairs, streamed once (e.g. `lmforge.data.corpora.iter_pairs`).
        tokenizer: tokenizes the text sides; its `eos_id` (if any) ends every one of them.
        kind: "seq2seq" (both sides are text) or "classification" (the second side is a label name).
        out: output folder, created if needed; files of an earlier prepare there are replaced.
        val_fraction: expected fraction of pairs in the val split, chosen by a hash of the source.
        shard_tokens: tokens per shard file.
        seed: salts the hash, i.e. picks a different (still deterministic) val split.
        batch_pairs: pairs tokenized per call (with batch_chars, bounds memory).
        batch_chars: a batch ends once its pairs hold this many characters.
        inputs: a JSON-able description of where the pairs came from, kept in the index.
        progress: show a progress bar; None shows it when stderr is a terminal.

    Returns:
        `out`, now holding the shards and `index.json`; read it with `PairShards`.
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"kind must be one of {', '.join(PAIR_KINDS)}, got {kind!r}")
    check_settings(val_fraction, seed)
    seq2seq = kind == "seq2seq"
    dtype, eos = token_dtype(tokenizer.vocab_size), tokenizer.eos_id
    names = [f"{split}.{side}" for split in SPLITS for side in ("source", "target")] if seq2seq else SPLITS
    seen: set[bytes] = set()
    label_ids: dict[str, int] = {}  # label -> provisional id (order of first appearance), sorted at the end
    provisional = {split: array("q") for split in SPLITS}
    counts = {"documents_seen": 0, "bytes_read": 0, "duplicates_removed": 0, "empty_removed": 0}
    with ShardFolder(Path(out), names, dtype, shard_tokens) as folder, \
            progress_bar(out, progress, unit=" pairs") as bar:
        for batch in batches(pairs, batch_pairs, batch_chars, lambda p: len(p[0]) + len(p[1])):
            kept, val = [], []
            for source, target in batch:
                src, tgt = source.encode("utf-8", "surrogatepass"), target.encode("utf-8", "surrogatepass")
                counts["bytes_read"] += len(src) + len(tgt)
                key = pair_digest(src, tgt, seed) if src and tgt else None
                if key is None:
                    counts["empty_removed"] += 1
                elif key in seen:
                    counts["duplicates_removed"] += 1
                else:
                    seen.add(key)
                    kept.append((source, target))
                    val.append(in_val(digest(src, seed), val_fraction))
            counts["documents_seen"] += len(batch)
            source_ids = tokenizer.encode_batch([s for s, _ in kept]) if kept else []
            target_ids = tokenizer.encode_batch([t for _, t in kept]) if kept and seq2seq else []
            for split, want_val in (("train", False), ("val", True)):
                chosen = [i for i, v in enumerate(val) if v == want_val]
                if not chosen:
                    continue
                if seq2seq:
                    folder.writers[f"{split}.source"].add(*pack([source_ids[i] for i in chosen], eos, dtype))
                    folder.writers[f"{split}.target"].add(*pack([target_ids[i] for i in chosen], eos, dtype))
                else:
                    folder.writers[split].add(*pack([source_ids[i] for i in chosen], eos, dtype))
                    provisional[split].extend(label_ids.setdefault(kept[i][1], len(label_ids)) for i in chosen)
            if len(label_ids) > MAX_LABELS:
                raise ValueError(f"more than {MAX_LABELS} distinct labels (e.g. {next(reversed(label_ids))!r}): "
                                 "classification needs a small set of class names; for text outputs use seq2seq")
            bar.update(len(batch))
        splits = folder.close_splits()
        fields: dict[str, Any] = {}
        if not seq2seq:
            labels = sort_labels(label_ids)
            final = np.empty(len(labels), LABEL_DTYPE)  # provisional id -> sorted id
            final[[label_ids[name] for name in labels]] = np.arange(len(labels))
            for split in SPLITS:
                ids = final[np.frombuffer(provisional[split], np.int64)]
                splits[split]["labels"] = folder.write_array(f"{split}_labels.bin", ids)
            fields["labels"] = labels
        n_pairs = sum(splits[f"{s}.source" if seq2seq else s]["n_documents"] for s in SPLITS)
        settings = {"val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "split": SPLIT_RULE}
        index = index_fields(kind, tokenizer, dtype, inputs, settings, {**counts, "documents_kept": n_pairs}, splits)
        return folder.finish({**index, **fields})



def prepare_pair_inputs(inputs: list[str], tokenizer: Tokenizer, out: str | Path, *,
                        kind: Literal["seq2seq", "classification"], **kwargs: Any) -> Path:
    """`prepare_pairs` over pair corpus names, .jsonl and .tsv files (read in order by
    `lmforge.data.corpora.iter_pairs`); `kwargs` go to `prepare_pairs`."""
    from lmforge.data.corpora import iter_pairs

    if not inputs:
        raise ValueError("no inputs: pass pair corpus names (translation-de, translation-fr, summaries, sentiment), "
                         ".jsonl or .tsv files")
    pairs = (pair for spec in inputs for pair in iter_pairs(spec))
    return prepare_pairs(pairs, tokenizer, out, kind=kind, inputs={"inputs": list(inputs), "pairs": kind}, **kwargs)

class PairShards:
    """One split of a folder of pairs, validated on open like `TokenShards` (sizes, sha256, tokenizer).

    `example(i)` gives what the pair batchers take: (source ids, target ids) for seq2seq
    (`batchers.Seq2SeqPairs`), (ids, label id) for classification (`batchers.SequenceClassification`).
    Ids come without the EOS prepare appended (`Seq2SeqPairs(eos_id=...)` appends it again).
    `ShardLoader` batches them when given a pair batcher.

    Attributes: `kind`, `n_documents` (pairs in the split), `sources` (`TokenShards` of the first
    side), `targets` (of the second side, seq2seq) or `label_ids` (int64 memmap, classification)
    and `labels` (label names by id, classification).
    """

    def __init__(self, folder: str | Path, split: str = "train", tokenizer: Tokenizer | None = None,
                 verify: bool = True) -> None:
        self.folder, self.split = Path(folder), split
        index = read_index(self.folder)
        self.kind: str = index.get("kind", "documents")
        if self.kind not in PAIR_KINDS:
            raise ValueError(f"{self.folder} holds {self.kind}, not pairs: read it with lmforge.data.shards."
                             "TokenShards, or prepare pairs with `lmforge data prepare --pairs seq2seq|classification`")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.targets: TokenShards | None = None
        self.labels: list[str] | None = None
        self.label_ids: np.ndarray | None = None
        if self.kind == "seq2seq":
            self.sources = TokenShards(folder, f"{split}.source", tokenizer, verify)
            self.targets = TokenShards(folder, f"{split}.target", tokenizer, verify)
            if self.sources.n_documents != self.targets.n_documents:
                raise ValueError(f"{self.folder} split {split!r} has {self.sources.n_documents} sources but "
                                 f"{self.targets.n_documents} targets; {self.sources.rebuild_hint}")
        else:
            self.sources = TokenShards(folder, split, tokenizer, verify)
            self.labels = list(index["labels"])
            entry = index["splits"][split]["labels"]
            self.label_ids = open_array(self.folder / entry["file"], self.sources.n_documents, LABEL_DTYPE,
                                        entry["sha256"], verify, self.sources.rebuild_hint)
            if len(self.label_ids) and not 0 <= self.label_ids.min() <= self.label_ids.max() < len(self.labels):
                raise ValueError(f"{self.folder / entry['file']} holds label ids outside [0, {len(self.labels)}); "
                                 f"{self.sources.rebuild_hint}")
        self.n_documents: int = self.sources.n_documents

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, int]:
        """Pair `i` (0 <= i < n_documents): (source ids, target ids) or (ids, label id)."""
        if self.targets is not None:
            return self.sources.document(i), self.targets.document(i)
        assert self.label_ids is not None
        source = self.sources.document(i)  # checks i
        return source, int(self.label_ids[i])

    def __len__(self) -> int:
        return self.n_documents

    def __repr__(self) -> str:
        extra = f", {len(self.labels)} labels" if self.labels is not None else ""
        return f"PairShards({str(self.folder)!r}, split={self.split!r}: {self.kind}, {self.n_documents:,} pairs{extra})"
