"""The unigram baseline is the cross-entropy of the add-one-smoothed unigram distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.eval.baseline import unigram_cross_entropy


def test_unigram_cross_entropy_matches_the_formula():
    train = np.array([0, 0, 0, 1, 2, 2])
    val = np.array([0, 2, 3])
    counts = np.array([3, 1, 2, 0]) + 1.0
    probs = counts / counts.sum()
    expected = -np.mean([math.log(probs[t]) for t in val])
    assert unigram_cross_entropy(train, val, vocab_size=4) == pytest.approx(expected)


def test_uniform_data_gives_log_vocab():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 200_000)
    assert unigram_cross_entropy(tokens, tokens[:5000], 50) == pytest.approx(math.log(50), rel=1e-3)
