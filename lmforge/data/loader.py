"""Deterministic, resumable, rank-sharded batches from a token stream.

The stream is cut into windows (`batcher.window(seq_len)` gives their length and stride), or,
with `by_document=True`, its documents are the items (each cut to the window length). With a
pair batcher (`Seq2SeqPairs`, `SequenceClassification`: no `window`) the items are the
source's examples (`lmforge.data.pair_shards.PairShards.example`), whole. Every
epoch shuffles the items with a generator seeded by (seed, epoch); rank r takes items r,
r + world_size, r + 2 world_size, ... of that order, the tail that does not fill a batch on every
rank is dropped, so all ranks run the same number of steps on disjoint items.

The batcher's random choices (masking, spans) use a generator seeded by (seed, epoch, step,
rank), so a batch is a pure function of its position: the position IS the whole generator state,
and `load_state_dict` of a saved position makes the next batches exactly those an uninterrupted
run would have produced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.data.batchers import StreamBatcher

PairBatcher = Callable[[list[Any]], dict[str, torch.Tensor]]  # Seq2SeqPairs, SequenceClassification

_SHUFFLE, _BATCH = 0, 1  # generator purposes; seed keys have a fixed length so they never collide


class TokenSource(Protocol):
    """A flat token stream (e.g. `lmforge.data.shards.TokenShards`); documents for `by_document`."""

    n_tokens: int

    def tokens(self, start: int, length: int) -> np.ndarray: ...

    # for by_document=True:  n_documents: int  and  document(i) -> np.ndarray
    # for a pair batcher:    n_documents: int  and  example(i) -> (ids, target ids or label id)


class ShardLoader:
    """Yields batches (dicts of tensors) forever, epoch after epoch; `next(loader)` or `for batch in loader`.

    Args:
        source: the token stream (`n_tokens`, `tokens(start, length)`; with by_document, also
            `n_documents` and `document(i)`), or pairs (`n_documents`, `example(i)`: `PairShards`).
        batcher: a stream batcher (`CausalLM`, `MaskedLM`, `SpanCorruption`, `Denoising`), or a
            pair batcher (`Seq2SeqPairs`, `SequenceClassification`) for a source of pairs.
        batch_size: samples per batch on this rank.
        seq_len: model sequence length; the batcher turns it into a window length. None with a
            pair batcher, which cuts examples to its own max lengths.
        seed: seeds the per-epoch shuffle and the batcher's randomness.
        rank, world_size: this process's share of the data in a distributed run.
        shuffle: shuffle items every epoch (False: stream order, e.g. for validation).
        by_document: items are whole documents (cut to the window length) instead of windows.
    """

    def __init__(
        self,
        source: TokenSource,
        batcher: StreamBatcher | PairBatcher,
        batch_size: int,
        seq_len: int | None,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        by_document: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}) and world_size must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.source, self.batcher = source, batcher
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle, self.by_document = rank, world_size, shuffle, by_document
        self.pairs = not hasattr(batcher, "window")
        if self.pairs:
            name = type(batcher).__name__
            if seq_len is not None:
                raise ValueError(f"seq_len={seq_len} does not apply to the pair batcher {name}, which cuts examples "
                                 "to its own max lengths (max_source_len, max_len); pass seq_len=None")
            if not hasattr(source, "example"):
                raise ValueError(f"the pair batcher {name} needs a source of pairs with example(i) "
                                 f"(lmforge.data.pair_shards.PairShards), got {type(source).__name__}")
        else:
            self.length, self.stride = batcher.window(seq_len)
        if by_document or self.pairs:
            self.n_items = int(source.n_documents)
            if self.n_items == 0:
                raise ValueError("the source has no documents; prepare data first (lmforge data prepare)")
        else:
            if source.n_tokens < self.length:
                raise ValueError(
                    f"seq_len={seq_len} needs windows of {self.length} tokens but the source has only "
                    f"{source.n_tokens}; lower seq_len or prepare more data"
                )
            self.n_items = (source.n_tokens - self.length) // self.stride + 1
        self.steps_per_epoch = self.n_items // world_size // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.n_items} {'pairs' if self.pairs else 'documents' if by_document else 'windows'} give no "
                f"full batch of {batch_size} on each of {world_size} ranks; lower batch_size or seq_len, or "
                "prepare more data"
            )
        self.epoch, self.step = 0, 0  # position of the NEXT batch
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, item order), cached

    def order(self, epoch: int) -> np.ndarray:
        """The item order of `epoch`, the same on every rank."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, _SHUFFLE, epoch, 0, 0])
                self._order = (epoch, rng.permutation(self.n_items))
            else:
                self._order = (epoch, np.arange(self.n_items))
        return self._order[1]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """Items of this rank's batch `step` in `epoch`."""
        first = step * self.batch_size
        return self.order(epoch)[self.rank :: self.world_size][first : first + self.batch_size]

    def sample(self, item: int) -> np.ndarray:
        if self.by_document:
            return np.asarray(self.source.document(int(item))[: self.length])
        return np.asarray(self.source.tokens(int(item) * self.stride, self.length))

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """The batch at a position, without moving the loader."""
        if self.pairs:  # pair batchers make no random choice
            return self.batcher([self.source.example(int(i)) for i in self.indices(epoch, step)])
        rng = np.random.default_rng([self.seed, _BATCH, epoch, step, self.rank])
        return self.batcher([self.sample(i) for i in self.indices(epoch, step)], rng)

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        out = self.batch(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: the position of the next batch plus what it is only valid with."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_items": self.n_items,
            "by_document": self.by_document,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; settings that change what a position means must match."""
        for key in ("seed", "world_size", "batch_size", "seq_len", "n_items", "by_document"):
            saved, ours = state[key], getattr(self, key)
            if saved != ours:
                raise ValueError(
                    f"loader state was saved with {key}={saved!r} but this loader has {key}={ours!r}; "
                    f"build the loader with {key}={saved!r} (and the same data) to resume exactly"
                )
        if not 0 <= state["step"] < self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(
                f"loader state position epoch={state['epoch']}, step={state['step']} is outside an epoch of "
                f"{self.steps_per_epoch} steps"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
