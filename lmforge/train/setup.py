"""What a run needs before its first step, built on first use and cached: the tokenizer (trained on
the recipe's data) and the token shards (documents, or (source, target) pairs for seq2seq). The
cache key covers everything that changes the result, so a second run, or a resumed one, reuses
them without work. Processes that start the same build at once (ranks of a multi-node job, or
separate runs) each build into their own temporary folder; the first to finish publishes it and the
others use it (`_build_once`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge._files import pid_alive
from lmforge.data.corpora import iter_documents, iter_pairs
from lmforge.data.fetch import default_cache_dir
from lmforge.data.pair_shards import PairShards, prepare_pair_inputs
from lmforge.data.shard_io import INDEX
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


def _tmp_folder(target: Path) -> Path:
    """This process's build folder for `target`: host and pid in the name, so processes on several
    nodes sharing the cache never build into the same folder, and a dead one's folder can be told."""
    return target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _remove_stale(target: Path) -> None:
    """Delete the build folders of `target` left by dead processes of this host (killed mid-build).

    A folder of another host is kept: its process cannot be checked from here. Folders named
    `.tmp-PID` (no host: older lmforge versions) are taken to be of this host.
    """
    host = socket.gethostname()
    for tmp in target.parent.glob(f"{target.name}.tmp-*"):
        owner = tmp.name[len(target.name) + len(".tmp-"):]
        tmp_host, _, pid = owner.rpartition("-")
        if pid.isdigit() and tmp_host in ("", host) and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _build_once(target: Path, build, complete) -> Path:
    """`target`, built by `build(folder)` into a temporary sibling and renamed into place if missing.

    The rename makes an interrupted build never look like a cache hit. Several processes (ranks on one
    or several nodes) may build the same entry at once: the first rename wins, and a process that loses
    the race drops its own build and uses the winner's (same key, so the same content). `complete(path)`
    tells a finished entry; a cached one that is not raises ValueError naming the fix.
    """
    _remove_stale(target)
    if not target.exists():
        tmp = _tmp_folder(target)
        shutil.rmtree(tmp, ignore_errors=True)  # a dead process with our pid left it
        try:
            build(tmp)
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.exists():  # not a lost race: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the loser's build, or a failed one
    if not complete(target):
        raise ValueError(f"{target} is in the cache but incomplete (not written by lmforge's build, or damaged); "
                         "delete it and run again to rebuild it")
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
    return Tokenizer.load(_build_once(target, build, lambda path: (path / "tokenizer.json").is_file()))


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
    return _build_once(target, build, lambda path: (path / INDEX).is_file())


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
