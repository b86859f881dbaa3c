"""The part every family shares: positions, a stack of blocks and a final norm over embeddings.

A decoder-only LM is a causal stack; an encoder is a bidirectional one; an encoder-decoder pairs a
bidirectional stack with a causal one whose blocks also cross-attend to the encoder's output.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.attention import AttentionMask, build_attention_mask
from lmforge.nn.block import Block
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.norms import make_norm
from lmforge.nn.positions import NoPositions, make_positions


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
        # ALiBi / T5 relative positions add a bias to every score: the mask must then always be built
        self.has_position_bias = type(self.positions).attention_bias is not NoPositions.attention_bias

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
        for name, value in (("attention_mask", attention_mask), ("document_ids", document_ids)):
            if value is not None and value.shape != (B, past + T):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but must be (batch, cached + new tokens) = {(B, past + T)}"
                )
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        x = self.drop(self.embed_norm(self.positions.add_to_embeddings(x, positions)))
        mask = self._self_mask(T, past, x.dtype, x.device, cache, attention_mask, document_ids)
        cross_mask = None
        if memory is not None and memory_mask is not None:  # None: every memory key visible, no tensor needed
            cross_mask = build_attention_mask(
                q_idx=torch.arange(past, past + T, device=x.device),
                k_idx=torch.arange(memory.shape[1], device=x.device), causal=False, dtype=x.dtype,
                key_padding=memory_mask,
            )
        rope = self.positions.rotary(positions)
        aux = []
        for block in self.blocks:
            x, block_aux = block(x, mask, rope=rope, cache=cache, memory=memory, memory_mask=cross_mask)
            aux.append(block_aux)
        return self.norm(x), mean_aux_losses(aux)

    def _self_mask(self, T: int, past: int, dtype: torch.dtype, device: torch.device, cache: KVCache | None,
                   attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None) -> AttentionMask:
        """The self-attention mask of T queries at positions past .. past + T - 1 over the keys the cache
        returns: contiguous positions 0 .. past + T - 1, or a ring buffer's slots (`cache.key_positions`)."""
        window = self.config.attention.sliding_window
        k_pos = cache.key_positions(T) if cache is not None else None  # (S,) slot positions; None: contiguous
        if (k_pos is None and attention_mask is None and document_ids is None and window is None
                and not self.has_position_bias and (not self.causal or T == 1 or past == 0)):
            # the common decode step (and an unpadded prefill): no tensor to build at all
            return AttentionMask(is_causal=self.causal and T > 1)
        q_idx = torch.arange(past, past + T, device=device)
        key_padding = attention_mask
        if k_pos is None:
            k_idx = torch.arange(past + T, device=device)
        else:
            if window is None or cache.window < window:
                raise ValueError(f"a ring-buffer cache of window {cache.window} cannot serve a model with "
                                 f"attention.sliding_window={window}: it would drop keys the model attends to; "
                                 "use a static or dynamic cache")
            if document_ids is not None:
                raise ValueError("document_ids (packed sequences) do not work with a sliding-window ring buffer "
                                 "cache; use a static or dynamic cache")
            k_idx = k_pos
            valid = (k_pos >= 0)[None]  # (1, S): empty slots hold negative positions
            # the key-padding mask follows the slots: column p of attention_mask belongs to position p
            key_padding = valid if attention_mask is None else (
                attention_mask.index_select(1, k_pos.clamp(min=0)).bool() & valid)  # (B, S)
        return build_attention_mask(
            q_idx=q_idx, k_idx=k_idx, causal=self.causal, dtype=dtype, window=window, key_padding=key_padding,
            position_bias=self.positions.attention_bias(q_idx, k_idx), documents=document_ids,
        )
