"""Encoder-only model (BERT, T5's encoder): bidirectional self-attention, then a head chosen by
`cfg.head`: masked-LM logits, sequence or token classification, or the hidden states."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.heads import make_head
from lmforge.models.output import ModelOutput
from lmforge.models.stack import Stack


class EncoderModel(Stack):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, causal=False)
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.head = make_head(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T), 1 for real tokens; token_type_ids (B, T) segment ids."""
        x = self.embed(input_ids) * self.config.embed_scale
        if self.token_types is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_types(types)
        hidden, aux = self.run(x, attention_mask=attention_mask, positions=positions)
        out = self.head(hidden, self.embed.weight)
        out.aux_losses = aux
        return out
