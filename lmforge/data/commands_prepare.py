"""Token shards from documents: `lmforge data prepare`."""

from __future__ import annotations

import json
import time
from pathlib import Path

SHARD_TOKENS = 2**24  # = shards.DEFAULT_SHARD_TOKENS; not imported so `lmforge --help` stays light


def prepare(inputs: list[str], tokenizer: Path | None = None, out: Path | None = None, val_fraction: float = 0.01,
            field: str | None = None, column: str | None = None, shard_tokens: int = SHARD_TOKENS,
            seed: int = 0, progress: bool = True) -> None:
    """Tokenize documents into train/val token shards (memory-mapped uint16/uint32 arrays plus index.json).

    Exact duplicate documents are removed, EOS ends every document, and a document's split is
    decided by a hash of its text, so re-running on the same inputs writes identical files.
    Training reads the folder with `lmforge.data.shards.TokenShards`.

    Args:
        inputs: fetched corpus names (see `lmforge data list`), text files, folders, globs, .jsonl or .parquet files.
        tokenizer: tokenizer folder (from `lmforge tokenizer train`, or a Hugging Face one); required.
        out: output folder for the shards and index.json; required. Earlier shards there are replaced.
        val_fraction: expected fraction of documents held out for validation.
        field: JSON key holding the text in .jsonl inputs.
        column: column holding the text in .parquet inputs.
        shard_tokens: tokens per shard file.
        seed: salt of the document hash that picks the val split.
        progress: show a progress bar (only when stderr is a terminal).
    """
    from lmforge.data.shards import prepare as prepare_shards
    from lmforge.tokenizer import Tokenizer

    if tokenizer is None or out is None:
        raise ValueError("both --tokenizer DIR and --out DIR are required, e.g. "
                         "`lmforge data prepare --tokenizer tok/ --out shards/ python-code`")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    tok = Tokenizer.load(tokenizer)
    start = time.perf_counter()
    prepare_shards(inputs, tok, out, val_fraction=val_fraction, field=field, column=column,
                   shard_tokens=shard_tokens, seed=seed, progress=None if progress else False)
    seconds = time.perf_counter() - start
    index = json.loads((Path(out) / "index.json").read_text())
    counts, splits = index["counts"], index["splits"]
    n_bytes = sum(p.stat().st_size for p in Path(out).glob("*_*.bin"))
    total = sum(s["n_tokens"] for s in splits.values())
    print(f"wrote {out}: {n_bytes / 1e6:.1f} MB of {index['dtype']} shards, tokenizer vocab "
          f"{index['tokenizer']['vocab_size']}, eos id {index['tokenizer']['eos_id']}")
    print(f"documents: {counts['documents_seen']:,} read, {counts['duplicates_removed']:,} duplicates and "
          f"{counts['empty_removed']:,} empty removed, {counts['documents_kept']:,} kept")
    for name, split in splits.items():
        print(f"{name}: {split['n_documents']:,} documents, {split['n_tokens']:,} tokens in "
              f"{len(split['shards'])} shard{'' if len(split['shards']) == 1 else 's'}")
    seconds = max(seconds, 1e-9)
    print(f"time: {seconds:.1f} s for {counts['bytes_read'] / 1e6:.1f} MB of text: "
          f"{counts['bytes_read'] / 1e6 / seconds:.1f} MB/s, {total / seconds:,.0f} tokens/s")
    if val_fraction > 0 and splits["val"]["n_documents"] == 0:
        print(f"warning: the val split is empty ({counts['documents_kept']} documents x val fraction "
              f"{val_fraction}); raise --val-fraction to hold some out")
