"""Validation shares: every number of processes evaluates the same set of batches (the end-to-end check under
torchrun is in test_loop.py and test_distributed.py; this one needs no processes)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lmforge.data.batchers import CausalLM
from lmforge.data.loader import ShardLoader
from lmforge.train.loop import eval_batches


class Stream:
    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens

    def tokens(self, start: int, length: int) -> np.ndarray:
        return np.arange(start, start + length)


def _loader(n_tokens: int = 8 * 4 + 1, **kwargs) -> ShardLoader:
    return ShardLoader(Stream(n_tokens), CausalLM(), batch_size=2, seq_len=4, seed=0, shuffle=False, **kwargs)


def _shares(n_batches: int, world: int, n_tokens: int = 8 * 4 + 1) -> list[list[tuple[tuple[int, ...], bool]]]:
    """For each rank: (first input id of each row, counted) of the batches it evaluates."""
    loader = _loader(n_tokens)
    return [[(tuple(batch["input_ids"][:, 0].tolist()), counted)
             for batch, counted in eval_batches(loader, n_batches, SimpleNamespace(world=world, rank=rank))]
            for rank in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n_batches", [1, 4, 6])  # 6 > the 4 batches of an epoch: wraps around as next() does
def test_ranks_evaluate_the_single_process_batches_between_them(world, n_batches):
    (single,) = _shares(n_batches, 1)
    assert all(counted for _, counted in single) and len(single) == n_batches
    loader = _loader()
    assert [rows for rows, _ in single] == [tuple(next(loader)["input_ids"][:, 0].tolist()) for _ in range(n_batches)]

    shares = _shares(n_batches, world)
    counted = [rows for share in shares for rows, c in share if c]
    assert sorted(counted) == sorted(rows for rows, _ in single), "the ranks together must cover the same batches"
    rounds = {len(share) for share in shares}
    assert rounds == {-(-n_batches // world)}, f"every rank must run the same number of forwards, got {rounds}"
    for share in shares:  # the re-runs that only keep the ranks in step come last
        flags = [c for _, c in share]
        assert flags == sorted(flags, reverse=True), flags


def test_a_sharded_or_shuffled_loader_is_refused():
    one = SimpleNamespace(world=1, rank=0)
    with pytest.raises(ValueError, match="single-process validation loader"):
        next(eval_batches(_loader(rank=1, world_size=2), 2, one))
    with pytest.raises(ValueError, match="shuffle=True"):
        next(eval_batches(ShardLoader(Stream(33), CausalLM(), batch_size=2, seq_len=4, seed=0), 2, one))
