"""What a run needs before its first step, built on first use and cached: the tokenizer (trained on
the recipe's data) and the token shards (documents, or (source, target) pairs for seq2seq). The
cache key covers everything that changes the result, so a second run, or a resumed one, reuses
them without work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.data.corpora import iter_documents, iter_pairs
from lmforge.data.fetch import default_cache_dir
from lmforge.data.pair_shards import PairShards, prepare_pair_inputs
from lmforge.data.shards import TokenShards, prepare
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.recipe import DataSection


def _input_signature(spec: str) -> str:
    """A corpus name as is; a local path with its size and mtime, so edited files give a new key."""
    path = Path(spec)
    if path.exists():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return spec


def _key(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _build_once(target: Path, build) -> Path:
    """Build into a temporary sibling and rename, so an interrupted build is never mistaken for a cache hit."""
    if target.exists():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    os.replace(tmp, target)
    return target


def _first_chars(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """The documents up to the one that reaches `max_chars` characters in all (None: every one)."""
    total = 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            return
        total += len(doc)
        yield doc


def tokenizer_for(data: DataSection, cache_dir: Path | None = None, log=print, *, pairs: bool = False) -> Tokenizer:
    """`data.tokenizer.path` loaded, or a tokenizer trained on `data.inputs` (cached); `pairs`: the inputs are
    (source, target) pairs and it is trained on both sides."""
    cfg = data.tokenizer
    if cfg.path is not None:
        return Tokenizer.load(cfg.path)
    cache = Path(cache_dir or default_cache_dir()) / "tokenizers"
    key = _key(inputs=[_input_signature(s) for s in data.inputs], kind=cfg.kind, vocab_size=cfg.vocab_size,
               sentinels=cfg.sentinels, max_chars=cfg.max_chars, pairs=pairs)
    target = cache / f"{cfg.kind}-{cfg.vocab_size}-{key}"
    if not target.exists():
        log(f"training a {cfg.kind} tokenizer ({cfg.vocab_size} tokens) on {', '.join(data.inputs)} -> {target}")

    def build(tmp: Path) -> None:
        if pairs:
            docs = (side for spec in data.inputs for pair in iter_pairs(spec) for side in pair)
        else:
            docs = (doc for spec in data.inputs for doc in iter_documents(spec))
        train_tokenizer(cfg.kind, _first_chars(docs, cfg.max_chars), cfg.vocab_size,
                        n_sentinels=cfg.sentinels).save(tmp)

    cache.mkdir(parents=True, exist_ok=True)
    return Tokenizer.load(_build_once(target, build))


def _cached(data: DataSection, tokenizer: Tokenizer, seed: int, cache_dir: Path | None, log, folder: str,
            what: str, build) -> Path:
    """Prepared data in `<cache>/<folder>/<key>`, built by `build(tmp)` on first use."""
    cache = Path(cache_dir or default_cache_dir()) / folder
    key = _key(inputs=[_input_signature(s) for s in data.inputs], tokenizer=tokenizer.fingerprint,
               val_fraction=data.val_fraction, seed=seed)
    target = cache / key
    if not target.exists():
        log(f"preparing {what} of {', '.join(data.inputs)} -> {target}")
    cache.mkdir(parents=True, exist_ok=True)
    return _build_once(target, build)


def shards_for(data: DataSection, tokenizer: Tokenizer, seed: int, cache_dir: Path | None = None,
               log=print) -> Path:
    return _cached(data, tokenizer, seed, cache_dir, log, "shards", "token shards",
                   lambda tmp: prepare(list(data.inputs), tokenizer, tmp, val_fraction=data.val_fraction,
                                       seed=seed, progress=False))


def open_splits(folder: Path, tokenizer: Tokenizer) -> tuple[TokenShards, TokenShards]:
    train = TokenShards(folder, "train", tokenizer=tokenizer)
    val = TokenShards(folder, "val", tokenizer=tokenizer)
    if val.n_tokens == 0:
        raise ValueError(f"the validation split of {folder} is empty; raise data.val_fraction or add data")
    return train, val


def pairs_for(data: DataSection, tokenizer: Tokenizer, seed: int, cache_dir: Path | None = None,
              log=print) -> Path:
    """`shards_for` for seq2seq: `data.inputs` are pair corpora or files, prepared with `prepare_pairs`."""
    return _cached(data, tokenizer, seed, cache_dir, log, "pairs", "(source, target) pair shards",
                   lambda tmp: prepare_pair_inputs(list(data.inputs), tokenizer, tmp, kind="seq2seq",
                                                   val_fraction=data.val_fraction, seed=seed, progress=False))


def open_pair_splits(folder: Path, tokenizer: Tokenizer) -> tuple[PairShards, PairShards]:
    train = PairShards(folder, "train", tokenizer=tokenizer)
    val = PairShards(folder, "val", tokenizer=tokenizer)
    if val.n_documents == 0:
        raise ValueError(f"the validation split of {folder} has no pairs; raise data.val_fraction or add data")
    return train, val
