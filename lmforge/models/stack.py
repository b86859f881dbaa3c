"""The part every family shares: positions, a stack of blocks and a final norm over embeddings.

A decoder-only LM is a causal stack; an encoder is a bidirectional one; an encoder-decoder pairs a
bidirectional stack with a causal one whose blocks also cross-attend to the encoder's output.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.attention import build_attention_mask
from lmforge.nn.block import Block
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.norms import make_norm
from lmforge.nn.positions import make_positions


def mean_aux_losses(per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average each auxiliary loss over the layers that produced it."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted({k for d in per_layer for k in d}):
        out[name] = torch.stack([d[name] for d in per_layer if name in d]).mean()
    return out


class Stack(nn.Module):
    def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool = False, n_layer: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.causal = causal
        self.positions = make_positions(cfg, bidirectional=not causal)
        self.embed_norm = make_norm(cfg.d_model, cfg.norm) if cfg.embed_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        n = cfg.n_layer if n_layer is None else n_layer
        self.blocks = nn.ModuleList(Block(cfg, cross=cross, layer_idx=i) for i in range(n))
        self.norm = make_norm(cfg.d_model, cfg.norm) if cfg.final_norm else nn.Identity()

    def run(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, T, D) token embeddings -> (hidden (B, T, D), auxiliary losses).

        attention_mask (B, past + T) and memory_mask (B, S) hold 1 for real tokens; positions (B, T)
        default to past + arange(T); the cache is written at cache.pos and advanced by the caller.
        document_ids (B, past + T): for packed sequences, tokens attend only within their document
        (pass positions that restart at each document too).
        """
        B, T, _ = x.shape
        past = cache.pos if cache is not None else 0
        device = x.device
        q_idx = torch.arange(past, past + T, device=device)
        k_idx = torch.arange(past + T, device=device)
        if positions is None:
            positions = q_idx[None].expand(B, T)
        for name, value in (("attention_mask", attention_mask), ("document_ids", document_ids)):
            if value is not None and value.shape != (B, past + T):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but must be (batch, cached + new tokens) = {(B, past + T)}"
                )
        x = self.drop(self.embed_norm(self.positions.add_to_embeddings(x, positions)))
        mask = build_attention_mask(
            q_idx=q_idx, k_idx=k_idx, causal=self.causal, dtype=x.dtype,
            window=self.config.attention.sliding_window, key_padding=attention_mask,
            position_bias=self.positions.attention_bias(q_idx, k_idx), documents=document_ids,
        )
        cross_mask = None
        if memory is not None:
            cross_mask = build_attention_mask(
                q_idx=q_idx, k_idx=torch.arange(memory.shape[1], device=device), causal=False, dtype=x.dtype,
                key_padding=memory_mask,
            )
        rope = self.positions.rotary(positions)
        aux = []
        for block in self.blocks:
            x, block_aux = block(x, mask, rope=rope, cache=cache, memory=memory, memory_mask=cross_mask)
            aux.append(block_aux)
        return self.norm(x), mean_aux_losses(aux)
