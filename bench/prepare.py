"""Throughput of `data prepare` (documents or pairs -> token shards).

    .venv/bin/python bench/prepare.py [--corpus prose] [--pairs seq2seq] [--mb 30] [--vocab-size 8192]
                                      [--train-mb 2] [--repeats 3] [--batch-docs 256]

The corpus is `--corpus` (a corpus name, fetched on first use with `fetch_corpus`, or a file,
folder or glob, read with `iter_documents`; with `--pairs`, a pair corpus or file read with
`iter_pairs`) or by default the Python standard library's .py files (about 30 MB, already on the
machine, one document per file: no network; `--mb` keeps the first files up to that size). A byte-level
BPE tokenizer is trained with `train_tokenizer` on the first `--train-mb` of it; then, in the same run,
the whole corpus goes through

- `encode`: the Rust engine alone (`encode_batch_fast` on the same batches, ids discarded): the
  ceiling for any pipeline built on it;
- `prepare`: `prepare_documents` / `prepare_pairs` on the documents in memory (hash, dedupe,
  split, tokenize, pack, write and fsync shards);
- `read+prepare` (with --corpus): what `lmforge data prepare CORPUS` runs, reading included.

Prints MB/s of UTF-8 text and tokens/s for each (best of --repeats) and prepare's overhead.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.data.corpora import fetch_corpus, iter_documents, iter_pairs
from lmforge.data.pair_shards import PAIR_KINDS, prepare_pair_inputs, prepare_pairs
from lmforge.data.shards import TokenShards, prepare, prepare_documents
from lmforge.tokenizer.train import train_tokenizer


def stdlib_documents(max_mb: float | None = None) -> list[str]:
    """The standard library's .py files in sorted path order; with `max_mb`, the first files up to that size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        if max_mb is not None and total >= max_mb * 1e6:
            break
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
            continue
        total += n_bytes(docs[-1])
    return docs


def n_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="corpus name, file, folder or glob (default: the stdlib .py files)")
    parser.add_argument("--pairs", choices=PAIR_KINDS, help="the corpus holds pairs of this kind")
    parser.add_argument("--mb", type=float, help="MB of the default stdlib corpus to use (default: all of it)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-mb", type=float, default=2.0, help="MB of the corpus to train the tokenizer on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-docs", type=int, default=256)
    args = parser.parse_args()
    if args.pairs and not args.corpus:
        parser.error("--pairs needs --corpus (a pair corpus such as translation-de, or a .jsonl/.tsv file)")
    if args.mb is not None and args.corpus:
        parser.error("--mb sizes the default stdlib corpus; drop it with --corpus (or pass a smaller corpus)")

    if args.corpus and not Path(args.corpus).exists():
        try:
            print(f"corpus {args.corpus}: {fetch_corpus(args.corpus)}")
        except ValueError:
            pass  # not a corpus name: a glob, which iter_documents / iter_pairs expands
    if args.pairs:
        items: list = list(iter_pairs(args.corpus))
        texts = [s for pair in items for s in (pair if args.pairs == "seq2seq" else pair[:1])]
        unit = f"{args.pairs} pairs"
    else:
        items = texts = list(iter_documents(args.corpus)) if args.corpus else stdlib_documents(args.mb)
        unit = "documents" if args.corpus else "stdlib .py files"
    mb = sum(n_bytes(x) for item in items for x in ([item] if isinstance(item, str) else item)) / 1e6
    print(f"corpus: {len(items):,} {unit}, {mb:.1f} MB of UTF-8 text; {os.cpu_count()} CPUs")
    train_texts, size = [], 0
    for text in texts:
        if size >= args.train_mb * 1e6:
            break
        train_texts.append(text)
        size += n_bytes(text)
    start = time.perf_counter()
    tok = train_tokenizer("bpe", train_texts, args.vocab_size)
    print(f"tokenizer: bpe, vocab {tok.vocab_size}, trained on {size / 1e6:.1f} MB in "
          f"{time.perf_counter() - start:.1f} s")

    def encode_only() -> int:
        n = 0
        for i in range(0, len(texts), args.batch_docs):
            n += sum(len(e.ids) for e in tok.engine.encode_batch_fast(texts[i : i + args.batch_docs]))
        return n

    with tempfile.TemporaryDirectory() as tmp:
        splits = [f"{s}.{side}" for s in ("train", "val") for side in ("source", "target")] \
            if args.pairs == "seq2seq" else ["train", "val"]

        def counted(run: Callable[[], object]) -> Callable[[], int]:
            def fn() -> int:
                run()
                return sum(TokenShards(tmp, split, verify=False).n_tokens for split in splits)
            return fn

        common = dict(progress=False)
        if args.pairs:
            runs = {"prepare": counted(lambda: prepare_pairs(items, tok, tmp, kind=args.pairs,
                                                             batch_pairs=args.batch_docs, **common)),
                    "read+prepare": counted(lambda: prepare_pair_inputs([args.corpus], tok, tmp, kind=args.pairs,
                                                                        **common))}
        else:
            runs = {"prepare": counted(lambda: prepare_documents(items, tok, tmp, batch_docs=args.batch_docs,
                                                                 **common))}
            if args.corpus:
                runs["read+prepare"] = counted(lambda: prepare([args.corpus], tok, tmp, **common))
        runs = {"encode": encode_only, **runs}
        times: dict[str, list[float]] = {name: [] for name in runs}
        n_tokens = {}
        for _ in range(args.repeats):  # interleaved, so a busy machine slows all alike
            for name, fn in runs.items():
                start = time.perf_counter()
                n_tokens[name] = fn()
                times[name].append(time.perf_counter() - start)
        results = {name: min(t) for name, t in times.items()}
        for name, best in results.items():
            print(f"{name:12s} {mb / best:6.2f} MB/s  {n_tokens[name] / best / 1e6:5.2f} M tokens/s  ({best:.2f} s, "
                  f"{n_tokens[name]:,} tokens)")
        counts = TokenShards(tmp, splits[0], verify=False).index["counts"]
        print(f"prepare: {counts['duplicates_removed']:,} duplicates and {counts['empty_removed']:,} empty removed "
              f"of {counts['documents_seen']:,}; time {results['prepare'] / results['encode']:.2f}x the bare encode")


if __name__ == "__main__":
    main()
