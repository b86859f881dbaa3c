"""Deterministic, resumable, rank-sharded batches from a token stream.

The stream is cut into windows (`batcher.window(seq_len)` gives their length and stride), or,
with `by_document=True`, its documents are the items (each cut to the window length). With a
pair batcher (`Seq2SeqPairs`, `SequenceClassification`: no `window`) the items are the
source's examples (`lmforge.data.pair_shards.PairShards.example`), whole. Every
epoch shuffles the items with a generator seeded by (seed, epoch), the same on every rank.

World-size independence. Step s of the loader (on every rank together) takes the next
batch_size x world_size items of that order, and rank r takes every world_size-th of them from the
r-th: items r, r + world_size, ... So the items of an optimiser step of `global_batch` samples
(global_batch / (batch_size x world_size) loader steps) are the same set whatever the number of
processes, and an epoch keeps a whole number of global batches (the tail is dropped), so every
rank runs the same number of steps on disjoint items and the epoch ends at the same sample under
any world size. A saved position is converted through the samples consumed in the epoch
(step x batch_size x world_size), so a run saved with 2 processes continues with 1 (or 4) on
exactly the items it would have seen.

Randomness. A batcher that makes random choices (masking, spans, infilling) is called once per
sample with a generator seeded by (seed, epoch, item), and the rows are padded together with the
batchers' conventions (`pad_id` on ids, 0 on attention masks, -100 on labels), so a sample's
masking depends on the sample, not on the rank or micro-batch it lands in (Megatron-LM's BERT
dataset seeds per sample the same way). `CausalLM` makes no random choice and batches in one call.
A batch is therefore a pure function of its position, the position IS the whole generator state,
and `load_state_dict` of a saved position makes the next batches exactly those an uninterrupted
run would have produced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.data.batchers import IGNORE_INDEX, CausalLM, StreamBatcher, check_pad

PairBatcher = Callable[[list[Any]], dict[str, torch.Tensor]]  # Seq2SeqPairs, SequenceClassification

_SHUFFLE, _SAMPLE = 0, 2  # generator purposes; seed keys have a fixed length so they never collide
# (1 was the per-(step, rank) batch generator of earlier versions)


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
        global_batch: samples per optimiser step over all ranks (a multiple of batch_size x
            world_size; default batch_size x world_size). Each epoch keeps a whole number of them, so
            epochs, and positions saved with one world size, mean the same under another.
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
        global_batch: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}) and world_size must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        per_step = batch_size * world_size
        global_batch = per_step if global_batch is None else global_batch
        if global_batch < 1 or global_batch % per_step:
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of batch_size x world_size "
                             f"= {batch_size} x {world_size}")
        self.global_batch = global_batch
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
        self.epoch_samples = self.n_items // global_batch * global_batch  # over all ranks
        self.steps_per_epoch = self.epoch_samples // per_step
        if self.steps_per_epoch == 0:
            of = f" (global batch {global_batch})" if global_batch != per_step else ""
            raise ValueError(
                f"{self.n_items} {'pairs' if self.pairs else 'documents' if by_document else 'windows'} give no "
                f"full batch of {batch_size} on each of {world_size} ranks{of}; lower batch_size or seq_len, or "
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
        """Items of this rank's batch `step` in `epoch`: every world_size-th of the step's items, from the rank-th."""
        per_step = self.batch_size * self.world_size
        return self.order(epoch)[step * per_step : (step + 1) * per_step][self.rank :: self.world_size]

    def sample(self, item: int) -> np.ndarray:
        if self.by_document:
            return np.asarray(self.source.document(int(item))[: self.length])
        return np.asarray(self.source.tokens(int(item) * self.stride, self.length))

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """The batch at a position, without moving the loader."""
        items = self.indices(epoch, step)
        if self.pairs:  # pair batchers make no random choice
            return self.batcher([self.source.example(int(i)) for i in items])
        if isinstance(self.batcher, CausalLM):  # nor does a causal LM batch
            return self.batcher([self.sample(i) for i in items])
        rows = [self.batcher([self.sample(i)], np.random.default_rng([self.seed, _SAMPLE, epoch, int(i), 0]))
                for i in items]
        return collate(rows, getattr(self.batcher, "pad_id", None), type(self.batcher).__name__)

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
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "n_items": self.n_items,
            "by_document": self.by_document,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position, also one saved with another world size or batch size: the
        position is converted through the samples consumed in the epoch (over all ranks). Settings that
        change which items a position means (seed, data, sequence length, epoch length) must match."""
        for key in ("seed", "seq_len", "n_items", "by_document"):
            saved, ours = state[key], getattr(self, key)
            if saved != ours:
                raise ValueError(
                    f"loader state was saved with {key}={saved!r} but this loader has {key}={ours!r}; "
                    f"build the loader with {key}={saved!r} (and the same data) to resume exactly"
                )
        saved_per_step = state["batch_size"] * state["world_size"]
        saved_global = state.get("global_batch", saved_per_step)  # states written before global_batch existed
        saved_epoch = self.n_items // saved_global * saved_global
        if saved_epoch != self.epoch_samples:
            raise ValueError(
                f"loader state was saved with global_batch={saved_global} but this loader has "
                f"global_batch={self.global_batch}: its epochs end at sample {saved_epoch}, ours at "
                f"{self.epoch_samples}; build the loader with global_batch={saved_global} (batch.global_batch)"
            )
        if not 0 <= state["step"] * saved_per_step < self.epoch_samples or state["epoch"] < 0:
            raise ValueError(
                f"loader state position epoch={state['epoch']}, step={state['step']} is outside an epoch of "
                f"{self.steps_per_epoch} steps"
            )
        sample = state["step"] * saved_per_step
        step, rest = divmod(sample, self.batch_size * self.world_size)
        if rest:
            raise ValueError(
                f"loader state position (sample {sample} of epoch {state['epoch']}, saved with batch_size="
                f"{state['batch_size']} x world_size={state['world_size']}) falls inside a step of this loader "
                f"(batch_size={self.batch_size} x world_size={self.world_size}); resume from a position at an "
                "optimiser-step boundary (checkpoints are) or keep the batch sizes"
            )
        self.epoch, self.step = int(state["epoch"]), int(step)


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int | None, who: str) -> dict[str, torch.Tensor]:
    """One-sample batches -> one batch, right-padded as every batcher pads (see `batchers`): -100 on
    labels, 0 on attention masks, `pad_id` on ids. With pad_id None the rows must have equal lengths."""
    out = {}
    for key in rows[0]:
        parts = [row[key] for row in rows]
        if key == "labels":
            value = IGNORE_INDEX
        elif key.endswith("attention_mask"):
            value = 0
        else:
            value = check_pad(pad_id, [p[0] for p in parts], who)
        length = max(p.shape[-1] for p in parts) if parts[0].dim() > 1 else None
        if length is not None:
            parts = [torch.nn.functional.pad(p, (0, length - p.shape[-1]), value=value) for p in parts]
        out[key] = torch.cat(parts)
    return out
