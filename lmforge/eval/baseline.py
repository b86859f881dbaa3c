"""Reference points a trained language model must beat."""

from __future__ import annotations

import numpy as np


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of `eval_tokens` under the add-one-smoothed unigram frequencies of
    `train_tokens`: what a model that ignores context entirely achieves."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(eval_tokens, dtype=np.int64)].mean())
