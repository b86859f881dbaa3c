"""Decoder-only language model (GPT-2, Llama, Mistral, Mixtral, Qwen2): tokens -> logits.

The model is stateless between calls: positions default to `cache.pos + arange(T)` and the caller
advances the cache after the call.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.heads import make_head
from lmforge.models.output import ModelOutput
from lmforge.models.stack import Stack
from lmforge.nn.kv_cache import KVCache


class DecoderLM(Stack):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, causal=True)
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.head = make_head(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); positions (B, T); attention_mask (B, past + T), 1 for real tokens;
        cache: written at cache.pos, which the caller advances afterwards; document_ids (B, past + T):
        packed documents attend only within themselves (with positions restarting per document)."""
        x = self.embed(input_ids) * self.config.embed_scale
        hidden, aux = self.run(x, attention_mask=attention_mask, positions=positions, cache=cache,
                               document_ids=document_ids)
        out = self.head(hidden, self.embed.weight)
        out.aux_losses = aux
        return out
