"""Token shards from documents or pairs: `lmforge data prepare`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

SHARD_TOKENS = 2**24  # = shards.DEFAULT_SHARD_TOKENS; not imported so `lmforge --help` stays light


def prepare(inputs: list[str], tokenizer: Path | None = None, out: Path | None = None, val_fraction: float = 0.01,
            field: str | None = None, column: str | None = None, shard_tokens: int = SHARD_TOKENS,
            seed: int = 0, pairs: Literal["seq2seq", "classification"] | None = None,
            progress: bool = True) -> None:
    """Tokenize documents into train/val token shards (memory-mapped uint16/uint32 arrays plus index.json).

    Exact duplicate documents are removed, EOS ends every document, and a document's split is
    decided by a hash of its text, so re-running on the same inputs writes identical files.
    Training reads the folder with `lmforge.data.shards.TokenShards`. With `--pairs`, the inputs
    are (source, target) or (text, label) pairs, read with `lmforge.data.pair_shards.PairShards`.

    Args:
        inputs: fetched corpus names (see `lmforge data list`), text files, folders, globs, .jsonl or .parquet files.
        tokenizer: tokenizer folder (from `lmforge tokenizer train`, or a Hugging Face one); required.
        out: output folder for the shards and index.json; required. Earlier shards there are replaced.
        val_fraction: expected fraction of documents held out for validation.
        field: JSON key holding the text in .jsonl inputs.
        column: column holding the text in .parquet inputs.
        shard_tokens: tokens per shard file.
        seed: salt of the document hash that picks the val split.
        pairs: read pairs, not documents: seq2seq (source -> target) or classification (text -> label), from
            pair corpora (translation-de, translation-fr, summaries, sentiment), .jsonl (source/target or
            text/label keys) or two-column .tsv files.
        progress: show a progress bar (only when stderr is a terminal).
    """
    from lmforge.data.pair_shards import prepare_pair_inputs
    from lmforge.data.shards import prepare as prepare_shards
    from lmforge.tokenizer import Tokenizer

    if tokenizer is None or out is None:
        raise ValueError("both --tokenizer DIR and --out DIR are required, e.g. "
                         "`lmforge data prepare --tokenizer tok/ --out shards/ python-code`")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if pairs is not None and (field or column):
        raise ValueError("--field and --column choose the text of document inputs; pair inputs have fixed keys "
                         "(source/target or text/label in .jsonl, two columns in .tsv): drop them with --pairs")
    tok = Tokenizer.load(tokenizer)
    show = None if progress else False
    start = time.perf_counter()
    if pairs is None:
        prepare_shards(inputs, tok, out, val_fraction=val_fraction, field=field, column=column,
                       shard_tokens=shard_tokens, seed=seed, progress=show)
    else:
        prepare_pair_inputs(inputs, tok, out, kind=pairs, val_fraction=val_fraction, shard_tokens=shard_tokens,
                            seed=seed, progress=show)
    seconds = time.perf_counter() - start
    index = json.loads((Path(out) / "index.json").read_text())
    counts, splits = index["counts"], index["splits"]
    n_bytes = sum(p.stat().st_size for p in Path(out).glob("*_*.bin"))
    total = sum(s["n_tokens"] for s in splits.values())
    print(f"wrote {out}: {n_bytes / 1e6:.1f} MB of {index['dtype']} shards, tokenizer vocab "
          f"{index['tokenizer']['vocab_size']}, eos id {index['tokenizer']['eos_id']}")
    noun = "pairs" if pairs else "documents"
    print(f"{noun}: {counts['documents_seen']:,} read, {counts['duplicates_removed']:,} duplicates and "
          f"{counts['empty_removed']:,} empty removed, {counts['documents_kept']:,} kept")
    if "labels" in index:
        print(f"labels: {len(index['labels'])} ({', '.join(index['labels'][:10])}"
              f"{', ...' if len(index['labels']) > 10 else ''}), ids in this order")
    for name, split in splits.items():
        print(f"{name}: {split['n_documents']:,} {noun}, {split['n_tokens']:,} tokens in "
              f"{len(split['shards'])} shard{'' if len(split['shards']) == 1 else 's'}")
    seconds = max(seconds, 1e-9)
    print(f"time: {seconds:.1f} s for {counts['bytes_read'] / 1e6:.1f} MB of text: "
          f"{counts['bytes_read'] / 1e6 / seconds:.1f} MB/s, {total / seconds:,.0f} tokens/s")
    if val_fraction > 0 and splits["val.source" if pairs == "seq2seq" else "val"]["n_documents"] == 0:
        print(f"warning: the val split is empty ({counts['documents_kept']} {noun} x val fraction "
              f"{val_fraction}); raise --val-fraction to hold some out")

