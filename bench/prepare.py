"""Throughput of `data prepare` (documents -> token shards) on a local corpus, offline.

    .venv/bin/python bench/prepare.py [--vocab-size 8192] [--train-mb 2] [--repeats 3] [--batch-docs 256]

The corpus is the Python standard library's .py files (about 30 MB, already on the machine, one
document per file). A byte-level BPE tokenizer is trained with `train_tokenizer` on the first
`--train-mb` of it; then, in the same run, the whole corpus goes through

- `encode`: the Rust engine alone (`encode_batch_fast` on the same batches, ids discarded): the
  ceiling for any pipeline built on it;
- `prepare`: `prepare_documents` (hash, dedupe, split, tokenize, pack, write and fsync shards).

Prints MB/s of UTF-8 text and tokens/s for both (best of --repeats) and prepare's overhead.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from lmforge.data.shards import TokenShards, prepare_documents
from lmforge.tokenizer.train import train_tokenizer


def stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
            continue
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-mb", type=float, default=2.0, help="MB of the corpus to train the tokenizer on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-docs", type=int, default=256)
    args = parser.parse_args()

    docs = stdlib_documents()
    mb = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs) / 1e6
    print(f"corpus: {len(docs)} stdlib .py files, {mb:.1f} MB; {os.cpu_count()} CPUs")
    train_docs, size = [], 0
    for doc in docs:
        if size >= args.train_mb * 1e6:
            break
        train_docs.append(doc)
        size += len(doc.encode("utf-8", "surrogatepass"))
    start = time.perf_counter()
    tok = train_tokenizer("bpe", train_docs, args.vocab_size)
    print(f"tokenizer: bpe, vocab {tok.vocab_size}, trained on {size / 1e6:.1f} MB in "
          f"{time.perf_counter() - start:.1f} s")

    def encode_only() -> int:
        n = 0
        for i in range(0, len(docs), args.batch_docs):
            n += sum(len(e.ids) for e in tok.engine.encode_batch_fast(docs[i : i + args.batch_docs]))
        return n

    with tempfile.TemporaryDirectory() as tmp:
        def prepare() -> int:
            prepare_documents(docs, tok, tmp, batch_docs=args.batch_docs, progress=False)
            return sum(TokenShards(tmp, split, verify=False).n_tokens for split in ("train", "val"))

        times: dict[str, list[float]] = {"encode": [], "prepare": []}
        n_tokens = {}
        for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
            for name, fn in (("encode", encode_only), ("prepare", prepare)):
                start = time.perf_counter()
                n_tokens[name] = fn()
                times[name].append(time.perf_counter() - start)
        results = {name: min(t) for name, t in times.items()}
        for name, best in results.items():
            print(f"{name:8s} {mb / best:6.2f} MB/s  {n_tokens[name] / best / 1e6:5.2f} M tokens/s  ({best:.2f} s, "
                  f"{n_tokens[name]:,} tokens)")
        counts = TokenShards(tmp, "train", verify=False).index["counts"]
        print(f"prepare: {counts['duplicates_removed']} duplicate and {counts['empty_removed']} empty files removed; "
              f"time {results['prepare'] / results['encode']:.2f}x the bare encode")


if __name__ == "__main__":
    main()
