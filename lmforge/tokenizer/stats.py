"""The numbers tokenizers are compared by, measured on a sample of text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from lmforge.tokenizer.tokenizer import Tokenizer, unicode_to_bytes


def tokenizer_stats(tokenizer: Tokenizer, texts: Iterable[str], n_longest: int = 10) -> dict:
    """Encode `texts` (no special tokens added) and measure the tokenizer on them.

    Returns a dict with
      bytes_per_token: UTF-8 bytes per token (compression; higher is better),
      tokens_per_word: tokens per whitespace-separated word (fertility; lower is better),
      vocab_used: fraction of the vocabulary that occurs at least once,
      unk_rate: fraction of tokens that are the unknown token (0 for byte-level BPE),
      longest_tokens: the `n_longest` longest tokens that occur, as (decoded text, bytes),
      plus the raw counts (n_texts, n_bytes, n_words, n_tokens, vocab_size).
    """
    texts = list(texts)
    counts: Counter[int] = Counter()
    for ids in tokenizer.encode_batch(texts):
        counts.update(ids)
    n_tokens = sum(counts.values())
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    special = tokenizer.special_ids()
    pieces = sorted((_piece(tokenizer, i) for i in counts if i not in special), key=lambda p: (-p[1], p[0]))
    unk = tokenizer.unk_id
    return {
        "n_texts": len(texts),
        "n_bytes": n_bytes,
        "n_words": n_words,
        "n_tokens": n_tokens,
        "vocab_size": tokenizer.vocab_size,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
        "tokens_per_word": n_tokens / n_words if n_words else 0.0,
        "vocab_used": len(counts) / tokenizer.vocab_size,
        "unk_rate": counts[unk] / n_tokens if unk is not None and n_tokens else 0.0,
        "longest_tokens": pieces[:n_longest],
    }


def _piece(tokenizer: Tokenizer, idx: int) -> tuple[str, int]:
    """(readable text, length in bytes) of one token: byte-level tokens are decoded, others shown as
    spelled ("▁the", "##ing"), their markers not counted."""
    token = tokenizer.id_to_token(idx)
    table = unicode_to_bytes()
    if tokenizer.byte_level and all(c in table for c in token):
        data = bytes(table[c] for c in token)
        return data.decode("utf-8", "replace"), len(data)
    text = token.removeprefix("##").replace("▁", " ")
    return token, len(text.encode("utf-8", "surrogatepass"))
