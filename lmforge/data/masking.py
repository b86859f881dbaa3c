"""Corruption objectives: masked LM (BERT) and text infilling (BART); T5 span corruption is in `spans.py`.

Each batcher is called as `batcher(samples, rng)` (see `batchers.py`): samples are 1-D token
arrays cut from the stream, `rng` a `numpy.random.Generator` that makes every random choice.
Labels hold -100 where no loss is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

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


def stochastic_round(x: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """floor(x + U), U ~ Uniform[0, 1): an integer whose expectation is exactly x.

    Rounding to nearest would bias short sequences (round(64 * 0.15) = 10 is 15.6%, not 15%).
    """
    return np.floor(np.asarray(x, dtype=np.float64) + rng.random(np.shape(x))).astype(np.int64)


@dataclass(frozen=True)
class MaskedLM:
    """Masked language modelling (BERT; Devlin et al. 2019 §3.1, "Task #1: Masked LM").

    Of the tokens that are neither special (`special_ids`, `mask_id`) nor padding, a fraction
    `mlm_probability` (15%) is selected; a selected token becomes [MASK] with probability 0.8,
    a random non-special token with probability 0.1, and stays unchanged otherwise. Labels are
    the original token at selected positions and -100 elsewhere.

    Whole-word masking (BERT's later release; Cui et al. 2019) selects whole words: give
    `word_start`, either a bool array over the vocabulary (True for ids that begin a word, e.g.
    WordPiece tokens not starting with "##") or a callable mapping a token-id array to such a
    bool array. Words are shuffled and added while they fit the budget, as in BERT's
    `create_pretraining_data.py`; the 80/10/10 choice is then made per token, as there.

    Departure: the per-sequence budget is `stochastic_round(n * 0.15)` (n non-special tokens),
    unbiased, where BERT rounds to nearest (and caps it at max_predictions_per_seq).
    """

    vocab_size: int
    mask_id: int
    special_ids: Sequence[int] = ()
    mlm_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    word_start: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None
    pad_id: int | None = None

    def __post_init__(self):
        check_fraction("mlm_probability", self.mlm_probability, "BERT uses 0.15")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError(
                f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} must be >= 0 "
                "with a sum <= 1 (the rest stays unchanged); BERT uses 0.8 and 0.1"
            )
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} is outside the vocabulary [0, {self.vocab_size})")
        if isinstance(self.word_start, np.ndarray) and self.word_start.shape != (self.vocab_size,):
            raise ValueError(
                f"word_start has shape {self.word_start.shape} but must be ({self.vocab_size},): one bool per "
                "vocabulary id; or pass a callable mapping token ids to word-start flags"
            )
        if len(self.random_ids) == 0:
            raise ValueError("every vocabulary id is special: no token is left to mask or to sample as a replacement")

    @cached_property
    def never_masked(self) -> np.ndarray:
        return np.unique(np.array([*self.special_ids, self.mask_id], dtype=np.int64))

    @cached_property
    def random_ids(self) -> np.ndarray:
        """The non-special vocabulary, where the 10% random replacements come from."""
        return np.setdiff1d(np.arange(self.vocab_size), self.never_masked)

    def window(self, seq_len: int) -> tuple[int, int]:
        check_seq_len(seq_len)
        return seq_len, seq_len

    def __call__(self, samples: Sequence[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        pad_id = check_pad(self.pad_id, samples, "MaskedLM")
        tokens = pad(samples, pad_id)
        real = lengths_mask(samples, tokens.shape[1])
        candidates = (real == 1) & ~np.isin(tokens, self.never_masked)
        budget = stochastic_round(candidates.sum(axis=1) * self.mlm_probability, rng)
        if self.word_start is None:
            selected = self._select_tokens(candidates, budget, rng)
        else:
            selected = self._select_words(tokens, candidates, budget, rng)
        u = rng.random(tokens.shape)
        to_mask = selected & (u < self.mask_fraction)
        to_random = selected & (u >= self.mask_fraction) & (u < self.mask_fraction + self.random_fraction)
        input_ids = tokens.copy()
        input_ids[to_mask] = self.mask_id
        input_ids[to_random] = self.random_ids[rng.integers(len(self.random_ids), size=int(to_random.sum()))]
        out = {"input_ids": input_ids, "labels": np.where(selected, tokens, IGNORE_INDEX)}
        if self.pad_id is not None:
            out["attention_mask"] = real
        return tensors(**out)

    @staticmethod
    def _select_tokens(candidates: np.ndarray, budget: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The `budget[b]` candidates of row b with the smallest random keys: a uniform random subset."""
        keys = np.where(candidates, rng.random(candidates.shape), 2.0)  # non-candidates sort last
        rank = np.argsort(np.argsort(keys, axis=1), axis=1)
        return rank < budget[:, None]

    def _select_words(
        self, tokens: np.ndarray, candidates: np.ndarray, budget: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        starts = self.word_start(tokens) if callable(self.word_start) else self.word_start[tokens]
        starts = np.asarray(starts, dtype=bool) | ~candidates  # specials and padding stand alone
        starts[:, 1:] |= ~candidates[:, :-1]  # so a word never spans a special token
        word = np.cumsum(starts, axis=1)
        selected = np.zeros_like(candidates)
        for b in range(tokens.shape[0]):
            positions = np.flatnonzero(candidates[b])
            ids, first, sizes = np.unique(word[b, positions], return_index=True, return_counts=True)
            taken, total = [], 0
            for w in rng.permutation(len(ids)):
                if total + sizes[w] > budget[b]:
                    continue  # BERT skips a word that would overshoot and tries the next
                taken.append(ids[w])
                total += sizes[w]
                if total == budget[b]:
                    break
            selected[b, positions[np.isin(word[b, positions], taken)]] = True
        return selected


@dataclass(frozen=True)
class Denoising:
    """BART text infilling (Lewis et al. 2020 §2.2): spans with Poisson(λ=3) lengths, each replaced by
    one [MASK], until 30% of the tokens are masked; a 0-length span inserts a [MASK].

    The decoder reconstructs the whole sample: labels = original tokens, decoder_input_ids =
    labels shifted right after `decoder_start_id` (BART: </s>). Inputs vary in length and are
    right-padded with `pad_id` (attention_mask 1 on real tokens).

    As fairseq's `DenoisingDataset`, span lengths are drawn until they cover the budget and the
    last is trimmed to fit. Departures: spans are placed without overlap and with at least one kept
    token between them, so exactly the budget (stochastic_round(0.3 n)) is masked, where fairseq
    draws start positions independently (spans may overlap) and works on whole words; sentence
    permutation and random-token replacement are not done.
    """

    mask_id: int
    decoder_start_id: int
    pad_id: int
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0

    def __post_init__(self):
        check_fraction("mask_ratio", self.mask_ratio, "BART uses 0.3")
        if self.poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda={self.poisson_lambda} must be > 0; BART uses 3")

    def window(self, seq_len: int) -> tuple[int, int]:
        check_seq_len(seq_len)
        return seq_len, seq_len

    def span_lengths(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Poisson span lengths covering stochastic_round(mask_ratio * n) tokens, last one trimmed."""
        budget = int(stochastic_round(self.mask_ratio * n, rng))
        if budget == 0:
            return np.zeros(0, dtype=np.int64)
        lengths = rng.poisson(self.poisson_lambda, size=budget)
        while lengths.sum() < budget:
            lengths = np.concatenate([lengths, rng.poisson(self.poisson_lambda, size=budget)])
        cum = np.cumsum(lengths)
        last = int(np.argmax(cum >= budget))
        lengths = lengths[: last + 1].copy()
        lengths[last] = budget - (cum[last - 1] if last else 0)
        while n - budget < len(lengths) - 1:  # tiny samples: merge spans until kept tokens can separate them
            lengths = np.concatenate([lengths[:-2], [lengths[-2] + lengths[-1]]])
        return rng.permutation(lengths)

    def infill(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One sample -> its noised copy."""
        n = len(tokens)
        lengths = self.span_lengths(n, rng)
        k = len(lengths)
        if k == 0:
            return np.asarray(tokens, dtype=np.int64).copy()
        # Kept tokens form k + 1 gaps, the k - 1 inner ones non-empty: a uniform composition of the
        # free tokens into k + 1 parts (stars and bars), plus one on each inner gap.
        free = n - int(lengths.sum()) - (k - 1)
        bars = np.sort(rng.choice(free + k, k, replace=False))
        gaps = np.diff(np.concatenate([[-1], bars, [free + k]])) - 1
        gaps[1:-1] += 1
        pieces, pos = [], 0
        for gap, length in zip(gaps[:-1], lengths):
            pieces += [tokens[pos : pos + gap], [self.mask_id]]
            pos += gap + length
        pieces.append(tokens[pos:])
        assert pos + gaps[-1] == n
        return np.concatenate(pieces).astype(np.int64)

    def __call__(self, samples: Sequence[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        sources = [self.infill(np.asarray(s), rng) for s in samples]
        input_ids = pad(sources, self.pad_id)
        labels = pad(samples, IGNORE_INDEX)
        return tensors(
            input_ids=input_ids,
            attention_mask=lengths_mask(sources, input_ids.shape[1]),
            decoder_input_ids=shift_right(labels, self.decoder_start_id, self.pad_id),
            decoder_attention_mask=lengths_mask(samples, labels.shape[1]),
            labels=labels,
        )
