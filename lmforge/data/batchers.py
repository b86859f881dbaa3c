"""Batchers: token samples -> batches of torch tensors for each training objective.

A stream batcher (`CausalLM` here; `MaskedLM`, `SpanCorruption`, `Denoising` in `masking.py`)
is called as `batcher(samples, rng)` with a list of 1-D integer arrays cut from the token stream
and a `numpy.random.Generator` that makes every random choice, so a batch is a pure function of
its samples and the generator's seed. `batcher.window(seq_len)` says how many stream tokens a
sample needs for a model sequence of `seq_len` and how far apart samples start;
`lmforge.data.loader.ShardLoader` cuts the stream with it.

Pair batchers (`Seq2SeqPairs`, `SequenceClassification`, `TokenClassification`) take lists of
(ids, target) pairs and are deterministic. Every batcher right-pads with `pad_id`, marks real
tokens with 1 in the attention mask and gives padding the label -100 (the loss's ignore index).
Ids, labels and masks come out as int64 tensors of shape (B, T).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

IGNORE_INDEX = -100  # labels with this value take no part in the loss (torch's cross_entropy default)


class StreamBatcher(Protocol):
    """What `ShardLoader` needs from a batcher."""

    def window(self, seq_len: int) -> tuple[int, int]:
        """(tokens per sample, stride between sample starts) for model sequences of `seq_len`."""
        ...

    def __call__(self, samples: Sequence[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]: ...


def pad(seqs: Sequence[Sequence[int] | np.ndarray], value: int, length: int | None = None) -> np.ndarray:
    """Right-pad 1-D sequences into one int64 array (B, length or the longest sequence)."""
    length = max((len(s) for s in seqs), default=0) if length is None else length
    out = np.full((len(seqs), length), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def lengths_mask(seqs: Sequence[Sequence[int] | np.ndarray], length: int) -> np.ndarray:
    """(B, length) int64: 1 on the first len(seq) positions of each row, 0 on padding."""
    n = np.array([len(s) for s in seqs])
    return (np.arange(length)[None, :] < n[:, None]).astype(np.int64)


def shift_right(labels: np.ndarray, start_id: int, pad_id: int) -> np.ndarray:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}], padding (-100) -> pad_id."""
    out = np.empty_like(labels)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1]
    out[out == IGNORE_INDEX] = pad_id
    return out


def tensors(**arrays: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in arrays.items()}


def check_pad(pad_id: int | None, seqs: Sequence, who: str) -> int:
    """pad_id, or a ValueError when samples of different lengths need one."""
    if pad_id is None and len({len(s) for s in seqs}) > 1:
        raise ValueError(
            f"{who} got samples of different lengths {sorted({len(s) for s in seqs})} but pad_id=None; "
            "pass pad_id (e.g. tokenizer.pad_id) or give samples of equal length"
        )
    return 0 if pad_id is None else pad_id


def check_seq_len(seq_len: int, minimum: int = 1) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < minimum:
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= {minimum}")


def check_fraction(name: str, value: float, hint: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must lie strictly between 0 and 1; {hint}")


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction on packed windows of the token stream (GPT; Radford et al. 2019).

    Documents are packed back to back with EOS between them (the stream already holds it), and
    each sample is a window of seq_len + 1 tokens: input_ids = window[:-1], labels = window[1:];
    consecutive windows overlap by one token so every stream token is a label exactly once.

    With `document_attention=True` the batch also holds `positions` and `document_ids` (B, T).
    A document starts at each EOS in input_ids: the EOS that ends one document opens the next
    (GPT-2's <|endoftext|> plays both roles), so the label of every position is predicted from
    tokens of its own document only. The consumer passes both to the model,
    `model(input_ids, positions=positions, document_ids=document_ids)`: positions restart at 0 in
    each document and attention becomes block-diagonal causal ("an attention mask that prevents
    self-attention between different documents", Llama 3 report, Dubey et al. 2024 §3.2).
    Samples of different lengths (whole documents) are right-padded with `pad_id`, labels -100.
    """

    eos_id: int | None = None
    document_attention: bool = False
    pad_id: int | None = None

    def __post_init__(self):
        if self.document_attention and self.eos_id is None:
            raise ValueError("document_attention=True needs eos_id (the separator between documents in the stream)")

    def window(self, seq_len: int) -> tuple[int, int]:
        check_seq_len(seq_len)
        return seq_len + 1, seq_len

    def __call__(
        self, samples: Sequence[np.ndarray], rng: np.random.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        # rng is unused: a causal LM batch involves no random choice
        pad_id = check_pad(self.pad_id, samples, "CausalLM")
        tokens = pad(samples, pad_id)
        real = lengths_mask(samples, tokens.shape[1])
        input_ids = tokens[:, :-1]
        labels = np.where(real[:, 1:] == 1, tokens[:, 1:], IGNORE_INDEX)
        out = {"input_ids": input_ids, "labels": labels}
        if self.pad_id is not None:
            out["attention_mask"] = real[:, :-1]
        if self.document_attention:
            T = input_ids.shape[1]
            idx = np.broadcast_to(np.arange(T), input_ids.shape)
            opens = input_ids == self.eos_id
            out["document_ids"] = np.cumsum(opens, axis=1)
            starts = np.maximum.accumulate(np.where(opens, idx, 0), axis=1)
            out["positions"] = idx - starts
        return tensors(**out)


@dataclass(frozen=True)
class Seq2SeqPairs:
    """(source ids, target ids) pairs -> encoder inputs, teacher-forced decoder inputs and labels.

    The target should end with EOS (the tokenizer's post-processor, or `eos_id` here appends it).
    decoder_input_ids = [decoder_start_id] + target[:-1] (T5: pad, BART: eos, Marian: pad).
    Sequences longer than `max_source_len` / `max_target_len` are truncated (keeping the EOS).
    """

    pad_id: int
    decoder_start_id: int
    eos_id: int | None = None
    max_source_len: int | None = None
    max_target_len: int | None = None

    def __call__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        sources = [self._fit(s, self.max_source_len) for s, _ in pairs]
        targets = [self._fit(t, self.max_target_len) for _, t in pairs]
        input_ids = pad(sources, self.pad_id)
        labels = pad(targets, IGNORE_INDEX)
        return tensors(
            input_ids=input_ids,
            attention_mask=lengths_mask(sources, input_ids.shape[1]),
            decoder_input_ids=shift_right(labels, self.decoder_start_id, self.pad_id),
            decoder_attention_mask=lengths_mask(targets, labels.shape[1]),
            labels=labels,
        )

    def _fit(self, ids: Sequence[int], limit: int | None) -> list[int]:
        ids = list(ids)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        if limit is not None and len(ids) > limit:
            ids = ids[: limit - 1] + ids[-1:] if self.eos_id is not None else ids[:limit]
        return ids


@dataclass(frozen=True)
class SequenceClassification:
    """(ids, class index) pairs -> input_ids, attention_mask (B, T) and labels (B,)."""

    pad_id: int
    max_len: int | None = None

    def __call__(self, pairs: Sequence[tuple[Sequence[int], int]]) -> dict[str, torch.Tensor]:
        seqs = [list(ids)[: self.max_len] for ids, _ in pairs]
        input_ids = pad(seqs, self.pad_id)
        return tensors(
            input_ids=input_ids,
            attention_mask=lengths_mask(seqs, input_ids.shape[1]),
            labels=np.array([label for _, label in pairs], dtype=np.int64),
        )


@dataclass(frozen=True)
class TokenClassification:
    """(ids, one label per token) pairs -> input_ids, attention_mask, labels (B, T).

    Labels are -100 on padding and on tokens in `special_ids` (e.g. [CLS], [SEP]), whatever label
    the pair gave them, so the loss counts only real tokens.
    """

    pad_id: int
    special_ids: Sequence[int] = ()
    max_len: int | None = None

    def __call__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        for i, (ids, labels) in enumerate(pairs):
            if len(ids) != len(labels):
                raise ValueError(
                    f"pair {i} has {len(ids)} tokens but {len(labels)} labels; give one label per token "
                    "(-100 for tokens to ignore)"
                )
        seqs = [list(ids)[: self.max_len] for ids, _ in pairs]
        input_ids = pad(seqs, self.pad_id)
        labels = pad([list(lab)[: self.max_len] for _, lab in pairs], IGNORE_INDEX)
        labels[np.isin(input_ids, list(self.special_ids))] = IGNORE_INDEX
        return tensors(input_ids=input_ids, attention_mask=lengths_mask(seqs, input_ids.shape[1]), labels=labels)
