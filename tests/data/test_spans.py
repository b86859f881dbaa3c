"""T5 span corruption: exact lengths, exact reconstruction, noise statistics."""

import numpy as np
import pytest

from lmforge.data.batchers import IGNORE_INDEX
from lmforge.data.spans import SpanCorruption, random_spans_noise_mask, span_corruption_lengths

VOCAB, PAD, EOS = 1000, 0, 1
SENTINELS = list(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> is the highest id, then descending


def make_batcher(**kwargs) -> SpanCorruption:
    return SpanCorruption(eos_id=EOS, sentinel_ids=SENTINELS, decoder_start_id=PAD, **kwargs)


def reconstruct(source: list[int], target: list[int]) -> list[int]:
    """Undo span corruption: put each sentinel's span from the target back into the input."""
    assert source[-1] == EOS and target[-1] == EOS
    spans, current = {}, None
    for t in target[:-1]:
        if t in SENTINELS:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in source[:-1]:
        out.extend(spans.pop(t) if t in SENTINELS else [t])
    assert not spans, "the target holds spans no sentinel in the input refers to"
    return out


def test_lengths_match_t5():
    # T5 / nanoT5 pretrain with inputs of 512: 568 raw tokens, targets of 114.
    assert span_corruption_lengths(512) == (568, 114)


@pytest.mark.parametrize("seq_len", [8, 16, 33, 64, 100, 128, 257, 512])
def test_inputs_have_exactly_the_requested_length(seq_len):
    batcher = make_batcher()
    raw, stride = batcher.window(seq_len)
    assert stride == raw
    target_len = span_corruption_lengths(seq_len)[1]
    rng = np.random.default_rng(seq_len)
    batch = batcher(list(rng.integers(2, 800, size=(4, raw))), rng)
    assert batch["input_ids"].shape == (4, seq_len)
    assert batch["labels"].shape == (4, target_len)
    assert (batch["input_ids"][:, -1] == EOS).all() and (batch["labels"][:, -1] == EOS).all()
    assert (batch["labels"] != IGNORE_INDEX).all()  # fixed lengths: nothing to pad


def test_input_and_target_reconstruct_the_original():
    batcher = make_batcher()
    raw, _ = batcher.window(64)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = rng.integers(2, 800, size=(8, raw))
        batch = batcher(list(rows), rng)
        for row, source, target in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
            assert reconstruct(source, target) == row.tolist()
        assert batch["decoder_input_ids"][:, 0].eq(PAD).all()
        assert (batch["decoder_input_ids"][:, 1:] == batch["labels"][:, :-1]).all()


def test_sentinels_are_used_in_order():
    batcher = make_batcher()
    source, target = batcher.corrupt(np.arange(2, 102), np.random.default_rng(3))
    in_source = [t for t in source.tolist() if t in SENTINELS]
    in_target = [t for t in target.tolist() if t in SENTINELS]
    assert in_source == in_target == SENTINELS[: len(in_source)]
    assert target[0] == SENTINELS[0]


def test_noise_density_and_mean_span_length():
    rng = np.random.default_rng(0)
    noise_tokens = spans = tokens = 0
    span_lengths = []
    for length in rng.integers(50, 600, size=300):
        mask = random_spans_noise_mask(int(length), 0.15, 3.0, rng)
        assert not mask[0], "T5's mask starts with a non-noise span"
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
        span_lengths += (ends - starts + 1).tolist()
        noise_tokens += mask.sum()
        spans += len(starts)
        tokens += length
    assert abs(noise_tokens / tokens - 0.15) < 0.005
    assert abs(noise_tokens / spans - 3.0) < 0.1
    assert len(set(span_lengths)) > 4, "span lengths should vary, not all equal the mean"


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"noise_density=1.2 must lie strictly between 0 and 1; T5 uses 0.15"):
        make_batcher(noise_density=1.2)
    with pytest.raises(ValueError, match=r"noise_density=0.0"):
        make_batcher(noise_density=0.0)
    with pytest.raises(ValueError, match="mean_noise_span_length=0.5 must be >= 1"):
        make_batcher(mean_noise_span_length=0.5)
    few = SpanCorruption(eos_id=EOS, sentinel_ids=SENTINELS[:3], decoder_start_id=PAD)
    with pytest.raises(ValueError, match=r"get 10 noise spans but only 3 sentinel ids.*add sentinels"):
        few.window(175)
    with pytest.raises(ValueError, match="seq_len=2 must be an integer >= 3"):
        make_batcher().window(2)
