"""tokenizer_stats: the comparison numbers, checked against counts made by hand."""

from __future__ import annotations

import pytest

from lmforge.tokenizer import tokenizer_stats


def test_stats_on_a_tiny_corpus(trained, corpus):
    tok = trained["bpe"]
    texts = corpus[:3] + ["1969 😀"]
    stats = tokenizer_stats(tok, texts, n_longest=5)
    ids = [tok.encode(t) for t in texts]
    n_tokens = sum(map(len, ids))
    assert stats["n_tokens"] == n_tokens
    assert stats["n_bytes"] == sum(len(t.encode()) for t in texts)
    assert stats["bytes_per_token"] == pytest.approx(stats["n_bytes"] / n_tokens)
    assert stats["tokens_per_word"] == pytest.approx(n_tokens / sum(len(t.split()) for t in texts))
    assert stats["vocab_used"] == pytest.approx(len({i for seq in ids for i in seq}) / tok.vocab_size)
    assert stats["unk_rate"] == 0.0  # byte-level: never unknown
    longest = stats["longest_tokens"]
    assert len(longest) == 5 and [n for _, n in longest] == sorted((n for _, n in longest), reverse=True)
    assert all(text in "".join(texts) and len(text.encode()) == n for text, n in longest)
    assert longest[0][1] == max(len(tok.decode([i]).encode()) for seq in ids for i in seq if "\ufffd" not in
                                tok.decode([i]))


def test_unknown_rate_counts_unk_tokens(trained):
    wp = trained["wordpiece"]
    stats = tokenizer_stats(wp, ["the cat ꙮ ᚠ", "dog"])
    ids = wp.encode_batch(["the cat ꙮ ᚠ", "dog"])
    n_unk = sum(seq.count(wp.unk_id) for seq in ids)
    assert n_unk == 2
    assert stats["unk_rate"] == pytest.approx(n_unk / sum(map(len, ids)))
    assert all(not text.startswith("[") for text, _ in stats["longest_tokens"])  # special tokens are not listed


def test_stats_of_no_text(trained):
    stats = tokenizer_stats(trained["unigram"], [])
    assert stats["n_tokens"] == 0 and stats["bytes_per_token"] == 0.0 and stats["longest_tokens"] == []
