"""Decoder-only language model (GPT-2, Llama, Mistral, Mixtral, Qwen2): tokens -> logits.

The model is stateless between calls: positions default to `cache.pos + arange(T)` and the caller
advances the cache after the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.output import ModelOutput
from lmforge.nn.attention import build_attention_mask
from lmforge.nn.block import Block
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.norms import make_norm
from lmforge.nn.positions import make_positions


def mean_aux_losses(per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average each auxiliary loss over the layers that produced it."""
    out: dict[str, torch.Tensor] = {}
    for name in {k for d in per_layer for k in d}:
        values = [d[name] for d in per_layer if name in d]
        out[name] = torch.stack(values).mean()
    return out


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.positions = make_positions(cfg, bidirectional=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer_idx=i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg.d_model, cfg.norm) if cfg.final_norm else nn.Identity()
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.lm_head_bias = nn.Parameter(torch.zeros(cfg.padded_vocab_size)) if cfg.lm_head_bias else None

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); positions (B, T); attention_mask (B, past + T), 1 for real tokens;
        cache: written at cache.pos, which the caller advances afterwards."""
        cfg = self.config
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        device = input_ids.device
        q_idx = torch.arange(past, past + T, device=device)
        k_idx = torch.arange(past + T, device=device)
        if positions is None:
            positions = q_idx[None].expand(B, T)
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but must be (batch, cached + new "
                f"tokens) = {(B, past + T)}"
            )
        x = self.embed(input_ids) * cfg.embed_scale
        x = self.drop(self.positions.add_to_embeddings(x, positions))
        mask = build_attention_mask(
            q_idx=q_idx, k_idx=k_idx, causal=True, dtype=x.dtype, window=cfg.attention.sliding_window,
            key_padding=attention_mask, position_bias=self.positions.attention_bias(q_idx, k_idx),
        )
        rope = self.positions.rotary(positions)
        aux = []
        for block in self.blocks:
            x, block_aux = block(x, mask, rope=rope, cache=cache)
            aux.append(block_aux)
        x = self.norm(x)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head, self.lm_head_bias)[..., : cfg.vocab_size]
        return ModelOutput(logits=logits, aux_losses=mean_aux_losses(aux))
