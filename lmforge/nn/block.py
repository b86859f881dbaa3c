"""A Transformer layer: self-attention, optional cross-attention, then a dense or MoE FFN.

Pre-norm (GPT-2, Llama):  x = x + attn(norm(x))
Post-norm (BERT, Vaswani): x = norm(x + attn(x))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.attention import Attention, AttentionMask
from lmforge.nn.mlp import make_mlp
from lmforge.nn.moe import MoE
from lmforge.nn.norms import make_norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, cross: bool = False, layer_idx: int = 0) -> None:
        super().__init__()
        d = cfg.d_model
        self.pre_norm = cfg.norm.placement == "pre"
        self.attn_norm = make_norm(d, cfg.norm)
        self.attn = Attention(d, cfg.attention, layer_idx=layer_idx)
        if cross:
            self.cross_norm = make_norm(d, cfg.norm)
            self.cross_attn = Attention(d, cfg.attention, cross=True, layer_idx=layer_idx)
        self.cross = cross
        self.mlp_norm = make_norm(d, cfg.norm)
        self.is_moe = cfg.moe is not None
        self.mlp = MoE(d, cfg.mlp, cfg.moe) if self.is_moe else make_mlp(d, cfg.mlp)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        if self.pre_norm:
            y = fn(norm(x))
            return x + (self.drop(y) if self.training else y)  # eval: skip the no-op dropout call
        y = fn(x)
        return norm(x + (self.drop(y) if self.training else y))

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        memory: torch.Tensor | None = None,
        memory_mask: AttentionMask | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, mask, rope=rope, cache=cache))
        if self.cross:
            memory_mask = AttentionMask() if memory_mask is None else memory_mask  # None: every memory key visible
            # the cache (if any) holds this layer's projected memory after the first step
            x = self._residual(x, self.cross_norm,
                               lambda h: self.cross_attn(h, memory_mask, memory=memory, cache=cache))
        aux: dict[str, torch.Tensor] = {}
        if self.is_moe:
            def ffn(h: torch.Tensor) -> torch.Tensor:
                y, layer_aux = self.mlp(h)
                aux.update(layer_aux)
                return y
        else:
            ffn = self.mlp
        x = self._residual(x, self.mlp_norm, ffn)
        return x, aux
