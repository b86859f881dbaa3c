"""Sessions: one model call per decoding step over a growing sequence, with the positions, masks and KV
cache that need; the engine's loop only sees `logits = session.prefill()` then `logits = session.step(tokens)`.

Each family has two sessions that must give the same tokens:
- the cached one (prefill the prompt into a `KVCache`, then feed one token per step; the session owns
  the positions and advances the cache after each call), and
- the reference one (`use_cache=False`): the whole sequence so far goes through the model at every step,
  with positions recomputed from the mask. Slow and obviously right: the oracle the cached one is
  tested against.

Batches of prompts with different lengths are LEFT padded for decoders (attention_mask 0 on the pads):
real tokens then end in the same column, so every row's next token is the last column, and positions
are counted over real tokens only (cumsum of the mask), so a padded row sees exactly what it would see
alone. Encoder-decoder sources are RIGHT padded (the encoder numbers positions by column, as Hugging Face
does), and every row's decoder starts from the same start token, so the decoder needs no padding.

Shapes: B batch, T prompt columns, V vocabulary. Logits returned are (B, V): the last position of each row.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.nn.kv_cache import CACHE_KINDS, make_cache


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 for real tokens -> (B, T) position of each real token among its row's real tokens
    (pads get 0; their outputs are never read)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _check_cache_kind(cache: str) -> None:
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache={cache!r} is not a cache kind; valid: {list(CACHE_KINDS)} (auto: a ring buffer "
                         "for sliding-window decoders, static otherwise)")


class DecoderSession:
    """A decoder-only model (`DecoderLM`) continuing left-padded prompts input_ids (B, T), mask (B, T).

    cache: "static" (T + max_new_tokens - 1 slots up front), "dynamic" (grows), "sliding" (a ring buffer of
    the model's sliding window) or "auto" (sliding for a sliding-window model, else static); see kv_cache.py.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int,
                 use_cache: bool, cache: str = "auto") -> None:
        _check_cache_kind(cache)
        B, T = input_ids.shape
        self.model = model
        self.padded = not bool(mask.all())  # no padding: the model may take its mask-free fast path
        self.mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=input_ids.device)
        self.mask[:, :T] = mask  # (B, T + N): generated tokens are always real
        self.lengths = mask.long().sum(-1, keepdim=True)  # (B, 1) real prompt tokens per row
        self.ids = input_ids  # (B, T); grows by one column per step on the reference path
        self.cache = None
        if use_cache:  # the last new token is returned, never fed back: T + N - 1 slots suffice
            p = _param(model)
            self.cache = make_cache(cache, model.config, B, T + max(max_new_tokens - 1, 0), dtype=p.dtype,
                                    device=p.device)

    def prefill(self) -> torch.Tensor:
        T = self.ids.shape[1]
        if self.cache is None:
            return self._recompute()
        logits = self.model(self.ids, positions=positions_from_mask(self.mask[:, :T]),
                            attention_mask=self.mask[:, :T] if self.padded else None, cache=self.cache).logits
        self.cache.advance(T)
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the tokens (B,) just chosen; return the logits (B, V) for the one after them."""
        if self.cache is None:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
            return self._recompute()
        past = self.cache.pos
        generated = past - self.ids.shape[1]  # new tokens already in the cache
        positions = self.lengths + generated  # (B, 1): right after each row's own tokens
        logits = self.model(tokens[:, None], positions=positions,
                            attention_mask=self.mask[:, :past + 1] if self.padded else None, cache=self.cache).logits
        self.cache.advance(1)
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """Row b of the batch becomes old row index[b] (B',): beam search keeps the surviving beams."""
        self.ids, self.mask, self.lengths = self.ids[index], self.mask[index], self.lengths[index]
        if self.cache is not None:
            self.cache.reorder(index)

    def _recompute(self) -> torch.Tensor:
        """The reference: the whole sequence so far, positions from the mask, no cache."""
        mask = self.mask[:, :self.ids.shape[1]]
        out = self.model(self.ids, positions=positions_from_mask(mask), attention_mask=mask if self.padded else None)
        return out.logits[:, -1]


class EncoderDecoderSession:
    """An encoder-decoder (`EncoderDecoderLM`): the source input_ids (B, S) with mask (B, S) (right padded)
    is encoded once; the decoder starts from `start_id` and is fed one token per step. With the cache, each
    decoder layer projects the encoder output to cross-attention keys/values once, into `cache.cross`.
    cache: as for `DecoderSession` ("auto" is static here)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int,
                 use_cache: bool, start_id: int, cache: str = "auto") -> None:
        _check_cache_kind(cache)
        B = input_ids.shape[0]
        self.model = model
        self.source = input_ids
        self.source_mask = None if bool(mask.all()) else mask
        self.ids = torch.full((B, 1), start_id, dtype=torch.long, device=input_ids.device)  # (B, 1 + steps)
        self.memory = None
        self.cache = None
        if use_cache:  # decoder inputs: the start token and all new tokens but the last
            p = _param(model)
            self.memory = model.encode(input_ids, self.source_mask)  # (B, S, D), reused by every step
            self.cache = make_cache(cache, model.config, B, max(max_new_tokens, 1), dtype=p.dtype, device=p.device)

    def prefill(self) -> torch.Tensor:
        if self.cache is None:
            return self._recompute()
        return self._cached(self.ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
            return self._recompute()
        return self._cached(tokens[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        """Row b of the batch becomes old row index[b] (B',): beam search keeps the surviving beams."""
        self.ids, self.source = self.ids[index], self.source[index]
        if self.source_mask is not None:
            self.source_mask = self.source_mask[index]
        if self.memory is not None:
            self.memory = self.memory[index]
        if self.cache is not None:
            self.cache.reorder(index)

    def _cached(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        positions = (self.cache.pos + torch.arange(T, device=tokens.device))[None].expand(B, T)
        logits = self.model(decoder_input_ids=tokens, decoder_positions=positions, memory=self.memory,
                            attention_mask=self.source_mask, cache=self.cache).logits
        self.cache.advance(T)
        return logits[:, -1]

    def _recompute(self) -> torch.Tensor:
        """The reference: encoder and the whole decoder sequence again, no cache."""
        return self.model(self.source, self.ids, attention_mask=self.source_mask).logits[:, -1]
