"""Tokenizer training time and encode throughput: lmforge's pipeline vs plain `tokenizers`, same text, same run.

    .venv/bin/python bench/tokenizer_speed.py [--mb 20] [--vocab-size 8192] [--kinds bpe] [--repeats 5]

The corpus is the Python standard library's .py files on this machine (sysconfig's "stdlib" path,
sorted, the first --mb megabytes; no network), one document per file. For each kind it trains a
tokenizer with `train_tokenizer` and times it, then times encoding the whole corpus with
`Tokenizer.encode_batch` (ours: the engine's batch encode without offsets, ids as lists) and with
`tokenizers.Tokenizer.encode_batch` on the same engine (plain: Encoding objects, ids taken from them),
interleaved, and prints the medians in MB/s and their ratio (> 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sysconfig
import time
from pathlib import Path

from lmforge.tokenizer import train_tokenizer


def stdlib_corpus(max_mb: float) -> list[str]:
    """The first `max_mb` MB of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text.encode())
        if total >= max_mb * 1e6:
            break
    return docs


def plain_encode(engine, docs: list[str]) -> list[list[int]]:
    """What a plain `tokenizers` user writes: batch encode, then take the ids of each Encoding."""
    return [e.ids for e in engine.encode_batch(docs, add_special_tokens=False)]


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--kinds", default="bpe", help="comma-separated: bpe,wordpiece,unigram")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    docs = stdlib_corpus(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: {len(docs)} stdlib .py files, {mb:.1f} MB; {os.cpu_count()} CPUs; "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    for kind in args.kinds.split(","):
        start = time.perf_counter()
        tok = train_tokenizer(kind, docs, args.vocab_size)
        train_s = time.perf_counter() - start
        ours_ids = tok.encode_batch(docs)
        assert ours_ids == plain_encode(tok.engine, docs), "ours and plain tokenizers disagree"
        n_tokens = sum(map(len, ours_ids))
        ours, plain = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            ours.append(_seconds(tok.encode_batch, docs))
            plain.append(_seconds(plain_encode, tok.engine, docs))
        ours_mbs, plain_mbs = mb / statistics.median(ours), mb / statistics.median(plain)
        print(f"{kind:9s} vocab={tok.vocab_size} train {train_s:.2f} s ({mb / train_s:.2f} MB/s)  "
              f"tokens={n_tokens} ({mb * 1e6 / n_tokens:.2f} bytes/token)  "
              f"encode ours {ours_mbs:.1f} MB/s, plain tokenizers {plain_mbs:.1f} MB/s, "
              f"ratio {ours_mbs / plain_mbs:.2f}")


if __name__ == "__main__":
    main()
