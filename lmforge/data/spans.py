"""T5 span corruption (Raffel et al. 2020 §3.1.4): the noise mask, the length arithmetic, the batcher.

Called as `batcher(samples, rng)` like every stream batcher (see `batchers.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.batchers import (
    IGNORE_INDEX,
    check_fraction,
    check_pad,
    check_seq_len,
    lengths_mask,
    pad,
    shift_right,
    tensors,
)


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a sample of `length` tokens, as T5's `random_spans_noise_mask`:
    round(length * density) noise tokens, clamped to [1, length - 1], in round(noise / mean) >= 1 spans."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return n_noise, max(int(round(n_noise / mean_noise_span_length)), 1)


def span_corruption_lengths(
    input_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(raw tokens per sample, target length) so that corrupted inputs are exactly `input_length` long.

    T5's `compute_input_and_target_lengths` (Raffel et al. 2020 §3.1.4; nanoT5): the input keeps the
    non-noise tokens, one sentinel per noise span and an EOS, so for L raw tokens with N noise
    tokens in S spans: input = L - N + S + 1, target = N + S + 1. We take the largest L whose input
    fits; input(L) grows by 0 or 1 per extra token, so it fits exactly (e.g. 512 -> L = 568, target 114).
    """
    check_seq_len(input_length, minimum=3)

    def input_len(tokens: int) -> int:
        n_noise, n_spans = span_counts(tokens, noise_density, mean_noise_span_length)
        return tokens - n_noise + n_spans + 1

    tokens = 2
    while input_len(tokens + 1) <= input_length:
        tokens += 1
    if input_len(tokens) != input_length:
        raise ValueError(
            f"no raw length gives span-corrupted inputs of exactly {input_length} tokens with noise_density="
            f"{noise_density} and mean_noise_span_length={mean_noise_span_length}; use a longer seq_len"
        )
    n_noise, n_spans = span_counts(tokens, noise_density, mean_noise_span_length)
    return tokens, n_noise + n_spans + 1


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split n_items into n_segments positive lengths, uniformly over all such splits (T5's
    `_random_segmentation`, which shuffles the segment-start flags; we draw the cut points)."""
    cuts = np.sort(rng.choice(n_items - 1, n_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Bool (length,), True on noise: T5's `random_spans_noise_mask` (Raffel et al. 2020 §3.1.4).

    Non-noise and noise spans alternate, starting with non-noise; both the noise tokens and the
    non-noise tokens are split into the same number of spans uniformly at random.
    """
    n_noise, n_spans = span_counts(length, noise_density, mean_noise_span_length)
    noise = random_segmentation(n_noise, n_spans, rng)
    keep = random_segmentation(length - n_noise, n_spans, rng)
    span_starts = np.cumsum(np.stack([keep, noise], axis=1).reshape(-1))[:-1]
    flags = np.zeros(length, dtype=np.int64)
    flags[span_starts] = 1
    return np.cumsum(flags) % 2 == 1


@dataclass(frozen=True)
class SpanCorruption:
    """T5 span corruption (Raffel et al. 2020 §3.1.4): noise density 0.15, mean span length 3.

    input  = non-noise tokens with each noise span replaced by one sentinel, then EOS;
    labels = each sentinel followed by the span it replaced, then EOS.
    `sentinel_ids[i]` is the i-th sentinel (T5: <extra_id_i>, the highest ids, descending:
    `[tokenizer.token_to_id(f"<extra_id_{i}>") for i in range(100)]`). `window(seq_len)` asks for
    as many raw tokens as fill inputs of exactly seq_len (`span_corruption_lengths`), so inputs
    and labels have fixed lengths and need no padding. decoder_input_ids = labels shifted right
    after `decoder_start_id` (T5: the pad id 0).
    """

    eos_id: int
    sentinel_ids: Sequence[int]
    decoder_start_id: int
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    pad_id: int | None = None

    def __post_init__(self):
        check_fraction("noise_density", self.noise_density, "T5 uses 0.15")
        if self.mean_noise_span_length < 1:
            raise ValueError(f"mean_noise_span_length={self.mean_noise_span_length} must be >= 1; T5 uses 3")
        if len(self.sentinel_ids) == 0:
            raise ValueError("sentinel_ids is empty: pass the ids of <extra_id_0>, <extra_id_1>, ...")

    def window(self, seq_len: int) -> tuple[int, int]:
        tokens, _ = span_corruption_lengths(seq_len, self.noise_density, self.mean_noise_span_length)
        self._check_sentinels(tokens)
        return tokens, tokens

    def _check_sentinels(self, length: int) -> None:
        n_spans = span_counts(length, self.noise_density, self.mean_noise_span_length)[1]
        if n_spans > len(self.sentinel_ids):
            raise ValueError(
                f"samples of {length} tokens get {n_spans} noise spans but only {len(self.sentinel_ids)} sentinel "
                "ids were given; add sentinels (tokenizer n_sentinels) or use a shorter seq_len"
            )

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One sample -> (input ids, target ids)."""
        if len(tokens) < 2:
            raise ValueError(f"span corruption needs samples of at least 2 tokens, got {len(tokens)}")
        self._check_sentinels(len(tokens))
        noise = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, rng)
        starts = noise & ~np.concatenate([[False], noise[:-1]])
        sentinels = np.asarray(self.sentinel_ids, dtype=np.int64)[: int(starts.sum())]
        source = np.where(starts, sentinels[np.cumsum(starts) - 1], tokens)[~noise | starts]
        target = np.insert(tokens[noise].astype(np.int64), np.flatnonzero(starts[noise]), sentinels)
        return np.append(source, self.eos_id), np.append(target, self.eos_id)

    def __call__(self, samples: Sequence[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        sources, targets = zip(*(self.corrupt(np.asarray(s), rng) for s in samples))
        pad_id = check_pad(self.pad_id, sources, "SpanCorruption")
        labels = pad(targets, IGNORE_INDEX)
        out = {"input_ids": pad(sources, pad_id), "labels": labels}
        out["decoder_input_ids"] = shift_right(labels, self.decoder_start_id, pad_id)
        if self.pad_id is not None:
            out["attention_mask"] = lengths_mask(sources, out["input_ids"].shape[1])
            out["decoder_attention_mask"] = lengths_mask(targets, labels.shape[1])
        return tensors(**out)
