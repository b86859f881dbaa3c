"""An explicit key/value cache. The model writes into it; the engine owns `pos` and advances it.

Keys and values are stored once per key/value head (GQA/MQA share them across query heads):
shape (B, K, max_len, D) per layer, pre-allocated.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # number of positions already written; advanced by the caller after a forward

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> KVCache:
        a = cfg.attention
        n_layer = cfg.n_decoder_layer if cfg.arch == "encoder_decoder" else cfg.n_layer  # cached: decoder only
        return cls(n_layer, batch, a.n_kv_head, a.head_dim, max_len, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at [pos, pos + T) and return all keys/values up to pos + T."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions but {end} are needed; "
                "allocate the cache with a larger max_len"
            )
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

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
