"""Masked LM (BERT) and text infilling (BART): statistics over many batches, invariants per batch."""

import numpy as np
import pytest

from lmforge.data.batchers import IGNORE_INDEX
from lmforge.data.masking import Denoising, MaskedLM

VOCAB, PAD, CLS, SEP, MASK = 500, 0, 1, 2, 3
SPECIALS = [PAD, CLS, SEP]


def bert_rows(rng, batch, length):
    """Rows like [CLS] text [SEP] text [SEP] with text ids in [4, VOCAB)."""
    rows = rng.integers(4, VOCAB, size=(batch, length))
    rows[:, 0] = CLS
    rows[:, length // 2] = SEP
    rows[:, -1] = SEP
    return rows


def test_masked_lm_statistics_match_bert():
    rng = np.random.default_rng(0)
    batcher = MaskedLM(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)
    counts = dict(candidates=0, selected=0, masked=0, replaced=0, kept=0)
    for _ in range(40):
        rows = bert_rows(rng, 32, 96)
        batch = batcher(list(rows), rng)
        inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        special = np.isin(rows, SPECIALS)
        selected = labels != IGNORE_INDEX
        assert not (selected & special).any(), "a special token was selected"
        assert np.array_equal(inputs[special], rows[special]), "a special token was changed"
        assert np.array_equal(labels[selected], rows[selected]), "labels must be the original tokens"
        assert np.array_equal(inputs[~selected], rows[~selected]), "an unselected token was changed"
        assert not np.isin(inputs[selected & (inputs != MASK)], SPECIALS + [MASK]).any(), "random token is special"
        counts["candidates"] += int((~special).sum())
        counts["selected"] += int(selected.sum())
        counts["masked"] += int((inputs[selected] == MASK).sum())
        counts["replaced"] += int(((inputs != rows) & (inputs != MASK)).sum())
        counts["kept"] += int((selected & (inputs == rows)).sum())
    rate = counts["selected"] / counts["candidates"]
    assert abs(rate - 0.15) < 0.01, f"selected {rate:.4f} of non-special tokens, expected 0.15"
    for name, expected in (("masked", 0.8), ("replaced", 0.1), ("kept", 0.1)):
        share = counts[name] / counts["selected"]
        assert abs(share - expected) < 0.02, f"{name} {share:.4f} of selected tokens, expected {expected}"


def test_whole_word_masking_masks_whole_words():
    word_start = np.arange(VOCAB) % 3 == 0  # ids divisible by 3 begin a word, the others continue one
    word_start[SPECIALS] = True
    rng = np.random.default_rng(1)
    for flags in (word_start, lambda ids: word_start[ids]):  # a vocabulary table or a callable
        batcher = MaskedLM(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, word_start=flags)
        selected_total = candidates = 0
        for _ in range(10):
            rows = bert_rows(rng, 16, 64)
            selected = batcher(list(rows), rng)["labels"].numpy() != IGNORE_INDEX
            special = np.isin(rows, SPECIALS)
            assert not (selected & special).any()
            starts = word_start[rows] | special
            starts[:, 1:] |= special[:, :-1]
            word = np.cumsum(starts, axis=1)
            for b in range(len(rows)):
                for w in np.unique(word[b][~special[b]]):
                    in_word = (word[b] == w) & ~special[b]
                    assert selected[b, in_word].all() or not selected[b, in_word].any(), (
                        f"row {b}: word {rows[b, in_word].tolist()} only partly selected"
                    )
            selected_total += selected.sum()
            candidates += (~special).sum()
        assert abs(selected_total / candidates - 0.15) < 0.03


def test_masked_lm_pads_and_never_selects_padding():
    batcher = MaskedLM(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, mlm_probability=0.5, pad_id=PAD)
    batch = batcher([np.arange(10, 30), np.arange(10, 15)], np.random.default_rng(0))
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 15
    assert (batch["labels"][1, 5:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, 5:] == PAD).all()


def test_masked_lm_is_reproducible_from_the_generator():
    batcher = MaskedLM(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)
    rows = list(bert_rows(np.random.default_rng(0), 4, 32))
    a, b = (batcher(rows, np.random.default_rng(7)) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_masked_lm_errors_name_value_and_fix():
    with pytest.raises(ValueError, match=r"mlm_probability=1.5 must lie strictly between 0 and 1; BERT uses 0.15"):
        MaskedLM(vocab_size=VOCAB, mask_id=MASK, mlm_probability=1.5)
    with pytest.raises(ValueError, match="sum <= 1"):
        MaskedLM(vocab_size=VOCAB, mask_id=MASK, mask_fraction=0.9, random_fraction=0.2)
    with pytest.raises(ValueError, match=r"word_start has shape \(10,\) but must be \(500,\)"):
        MaskedLM(vocab_size=VOCAB, mask_id=MASK, word_start=np.ones(10, bool))


def is_infilling(source: list[int], original: list[int], mask: int) -> bool:
    """Can `original` be produced by replacing each mask in `source` with some (maybe empty) span?"""
    pieces = [[]]
    for t in source:
        pieces.append([]) if t == mask else pieces[-1].append(t)
    if len(pieces) == 1:
        return source == original
    first, *middle, last = pieces
    if original[: len(first)] != first or original[len(original) - len(last) :] != last:
        return False
    pos, end = len(first), len(original) - len(last)
    for piece in middle:  # leftmost matches leave the most room for the rest
        starts = [i for i in range(pos, end - len(piece) + 1) if original[i : i + len(piece)] == piece]
        if not starts:
            return False
        pos = starts[0] + len(piece)
    return True


def test_text_infilling_masks_thirty_percent_and_targets_the_original():
    batcher = Denoising(mask_id=MASK, decoder_start_id=SEP, pad_id=PAD)
    assert batcher.window(64) == (64, 64)
    rng = np.random.default_rng(0)
    masked = total = 0
    for _ in range(30):
        rows = rng.integers(4, VOCAB, size=(16, 64))
        batch = batcher(list(rows), rng)
        assert np.array_equal(batch["labels"].numpy(), rows), "the target must be the original"
        assert batch["decoder_input_ids"][:, 0].eq(SEP).all()
        assert np.array_equal(batch["decoder_input_ids"][:, 1:].numpy(), rows[:, :-1])
        for b, row in enumerate(rows):
            n_real = int(batch["attention_mask"][b].sum())
            source = batch["input_ids"][b, :n_real].tolist()
            assert (batch["input_ids"][b, n_real:] == PAD).all()
            kept = sum(t != MASK for t in source)
            masked += len(row) - kept
            total += len(row)
            assert is_infilling(source, row.tolist(), MASK), f"row {b}: {source} does not infill {row.tolist()}"
    assert abs(masked / total - 0.3) < 0.01, f"masked {masked / total:.4f} of tokens, expected 0.3"


def test_text_infilling_span_lengths_are_poisson():
    batcher = Denoising(mask_id=MASK, decoder_start_id=SEP, pad_id=PAD)
    rng = np.random.default_rng(0)
    lengths = np.concatenate([batcher.span_lengths(1000, rng) for _ in range(50)])
    assert (lengths >= 0).all()
    assert abs(lengths.mean() - 3) < 0.2  # Poisson(3), the last span of each sample trimmed
    assert abs((lengths == 0).mean() - np.exp(-3)) < 0.02  # 0-length spans: inserted masks


def test_denoising_errors():
    with pytest.raises(ValueError, match="mask_ratio=0 must lie strictly between 0 and 1; BART uses 0.3"):
        Denoising(mask_id=MASK, decoder_start_id=SEP, pad_id=PAD, mask_ratio=0)
    with pytest.raises(ValueError, match="poisson_lambda=-1"):
        Denoising(mask_id=MASK, decoder_start_id=SEP, pad_id=PAD, poisson_lambda=-1)


def test_text_infilling_survives_tiny_samples():
    batcher = Denoising(mask_id=MASK, decoder_start_id=SEP, pad_id=PAD)
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        for _ in range(50):
            row = list(range(10, 10 + n))
            assert is_infilling(batcher.infill(np.array(row), rng).tolist(), row, MASK)
