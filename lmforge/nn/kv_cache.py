"""Explicit key/value caches. The model writes into them; the engine owns `pos` and advances it.

Keys and values are stored once per key/value head (GQA/MQA share them across query heads), as
(B, K, slots, D) per layer:

- `KVCache` (static): `max_len` slots pre-allocated up front; overflowing them is an error.
- `DynamicKVCache`: grows as needed, doubling its capacity (amortised O(1) copies per token).
- `SlidingWindowKVCache`: a ring buffer of `window + spare` slots for sliding-window models
  (Mistral, Beltagy et al. 2020 "Longformer" §3.1): memory O(window) whatever the generated length.

Every cache also holds `cross[layer]`: an encoder-decoder's cross-attention keys/values of the encoder
output, projected once per generation and reused at every step (a cache belongs to one source batch).

The model asks `key_positions(T)` for the absolute position of each key `update` will return for the next
T tokens (to build causal, window and padding masks); None means the contiguous positions 0 .. pos + T - 1.
"""

from __future__ import annotations

import torch


class KVCache:
    """Static cache: (B, K, max_len, D) per layer, pre-allocated."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer  # (B, K, S, D) each
        self.max_len = max_len
        self.pos = 0  # number of positions already written; advanced by the caller after a forward

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> KVCache:
        a = cfg.attention
        return cls(_cached_layers(cfg), batch, a.n_kv_head, a.head_dim, max_len, dtype, device)

    def key_positions(self, n_new: int) -> torch.Tensor | None:
        """Absolute positions (S,) of the keys `update` returns for n_new tokens; None: 0 .. pos + n_new - 1."""
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at [pos, pos + T) and return all keys/values up to pos + T."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.k[layer].shape[2]:
            self._make_room(layer, end)
        # narrow + copy_: fewer dispatcher calls than slice assignment, which matters on a decode step
        self.k[layer].narrow(2, self.pos, T).copy_(k)
        self.v[layer].narrow(2, self.pos, T).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)

    def _make_room(self, layer: int, end: int) -> None:
        raise ValueError(
            f"KV cache holds {self.max_len} positions but {end} are needed; "
            "allocate the cache with a larger max_len (or use a DynamicKVCache)"
        )

    def advance(self, n: int) -> None:
        self.pos += n

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding drops rejected draft tokens);
        the slots are overwritten by the next update."""
        if not 0 <= length <= self.pos:
            raise ValueError(f"cannot crop the KV cache to {length} positions: it holds {self.pos}")
        self.pos = length

    def reorder(self, index: torch.Tensor) -> None:
        """Rows of the new batch are rows `index` (B,) of the old one (beam search keeps the surviving beams)."""
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer].index_select(0, index)
            self.v[layer] = self.v[layer].index_select(0, index)
            if self.cross[layer] is not None:
                self.cross[layer] = tuple(t.index_select(0, index) for t in self.cross[layer])


class DynamicKVCache(KVCache):
    """Grows as needed: no length up front. When a write passes the capacity the layer's buffers are
    re-allocated at max(needed, 2 x capacity), so n tokens cost O(n) copying in all, not a `cat` per step.
    max_len is only the initial capacity (0: allocate on the first write)."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(n_layer, batch, n_kv_head, head_dim, max_len, dtype, device)

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> DynamicKVCache:
        return super().for_model(cfg, batch, max_len, dtype, device)

    def _make_room(self, layer: int, end: int) -> None:
        old_k, old_v = self.k[layer], self.v[layer]
        B, K, capacity, D = old_k.shape
        new_shape = (B, K, max(end, 2 * capacity), D)
        self.k[layer] = old_k.new_zeros(new_shape)
        self.v[layer] = old_v.new_zeros(new_shape)
        self.k[layer][:, :, :self.pos] = old_k[:, :, :self.pos]
        self.v[layer][:, :, :self.pos] = old_v[:, :, :self.pos]
        self.max_len = max(self.max_len, new_shape[2])


class SlidingWindowKVCache(KVCache):
    """A ring buffer for sliding-window attention: position p lives in slot p % capacity, with
    capacity = window + spare; memory stays O(window) however long the sequence grows.

    One new token (a decode step) is written first and the whole ring returned: with spare 0 it then holds
    exactly the window the query sees. A chunk of T > 1 tokens (a prefill, maybe longer than the window)
    gets the ring as it was plus the chunk's own keys, (B, K, capacity + T, D), so every query in the chunk
    sees its full window; then the chunk's last min(T, capacity) keys are written into the ring. Slots that
    are empty or out of the window are masked by the model through `key_positions` (negative = empty).

    `spare` extra slots let `crop` move back: it works while the window before the new end is still held,
    i.e. for up to spare + 1 positions once the ring has wrapped (speculative decoding: spare >= draft length).
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", spare: int = 0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"a sliding-window cache needs window >= 1 (the model's attention.sliding_window), "
                             f"got {window!r}")
        if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
            raise ValueError(f"spare={spare!r} must be an integer >= 0 (extra slots that let crop move back)")
        super().__init__(n_layer, batch, n_kv_head, head_dim, window + spare, dtype, device)
        self.window = window
        self.capacity = window + spare

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", spare: int = 0) -> SlidingWindowKVCache:
        """max_len is accepted for a common signature and ignored: the ring holds window + spare slots."""
        a = cfg.attention
        if a.sliding_window is None:
            raise ValueError("a sliding-window (ring buffer) cache needs a model with attention.sliding_window "
                             "set; use a static or dynamic cache for this model")
        return cls(_cached_layers(cfg), batch, a.n_kv_head, a.head_dim, a.sliding_window, dtype, device, spare)

    def _slot_positions(self, written: int) -> torch.Tensor:
        """(capacity,) the newest position < written stored in each slot; negative where none is."""
        slots = torch.arange(self.capacity, device=self.k[0].device)
        return written - 1 - (written - 1 - slots).remainder(self.capacity)

    def key_positions(self, n_new: int) -> torch.Tensor:
        if n_new == 1:  # written first, then the ring is returned
            return self._slot_positions(self.pos + 1)
        new = torch.arange(self.pos, self.pos + n_new, device=self.k[0].device)
        return torch.cat([self._slot_positions(self.pos), new])  # (capacity + T,)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, C = k.shape[2], self.capacity
        if T == 1:
            slot = self.pos % C
            self.k[layer].narrow(2, slot, 1).copy_(k)
            self.v[layer].narrow(2, slot, 1).copy_(v)
            return self.k[layer], self.v[layer]  # (B, K, C, D)
        keys = torch.cat([self.k[layer], k], dim=2)  # (B, K, C + T, D): read before the chunk overwrites slots
        values = torch.cat([self.v[layer], v], dim=2)
        n = min(T, C)
        slots = torch.arange(self.pos + T - n, self.pos + T, device=k.device).remainder(C)
        self.k[layer].index_copy_(2, slots, k[:, :, T - n:])
        self.v[layer].index_copy_(2, slots, v[:, :, T - n:])
        return keys, values

    def crop(self, length: int) -> None:
        """Forget positions from `length` on; possible while the window before `length` is still in the ring."""
        if not 0 <= length <= self.pos:
            raise ValueError(f"cannot crop the KV cache to {length} positions: it holds {self.pos}")
        oldest_held = self.pos - self.capacity  # slots hold positions >= this one
        needed = max(0, length - self.window + 1)  # the keys a query at `length` sees in the cache
        if needed < oldest_held:
            raise ValueError(
                f"cannot crop the sliding-window KV cache back to {length} positions: its {self.capacity} slots "
                f"hold positions {oldest_held}..{self.pos - 1} and the window needs {needed}..{length - 1}; "
                f"build it with spare >= {self.pos - length - 1} to move back {self.pos - length} positions"
            )
        # Slots now holding positions >= length read as positions <= length - window (see _slot_positions),
        # out of every later query's window, so the mask hides them until they are overwritten.
        self.pos = length


CACHES = {"static": KVCache, "dynamic": DynamicKVCache, "sliding": SlidingWindowKVCache}
CACHE_KINDS = ("auto", *CACHES)


def make_cache(kind: str, cfg, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> KVCache:
    """A cache for `cfg`'s cached layers. kind: "static" (max_len slots), "dynamic" (grows), "sliding"
    (a ring buffer of the model's sliding window), or "auto": sliding for a decoder-only model with a
    sliding window, static otherwise."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache={kind!r} is not a cache kind; valid: {list(CACHE_KINDS)}")
    if kind == "auto":
        kind = "sliding" if cfg.arch == "decoder" and cfg.attention.sliding_window is not None else "static"
    if kind == "dynamic":
        return DynamicKVCache.for_model(cfg, batch, dtype=dtype, device=device)
    return CACHES[kind].for_model(cfg, batch, max_len, dtype, device)


def _cached_layers(cfg) -> int:
    return cfg.n_decoder_layer if cfg.arch == "encoder_decoder" else cfg.n_layer  # cached: decoder only
