"""Encoder-decoder model (T5, BART, Marian, the original Transformer): the encoder reads the source
once; the decoder's causal self-attention and cross-attention to the encoder output produce logits.

    logits = model(input_ids, decoder_input_ids).logits        # (B, T_dec, V)
    memory = model.encode(input_ids, attention_mask)            # reuse across decoding steps:
    logits = model(decoder_input_ids=ids, memory=memory, attention_mask=attention_mask).logits
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.heads import LMHead
from lmforge.models.output import ModelOutput
from lmforge.models.stack import Stack
from lmforge.nn.kv_cache import KVCache


class EncoderDecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)  # shared by encoder, decoder and head
        self.encoder = Stack(cfg, causal=False)
        self.decoder = Stack(cfg, causal=True, cross=True, n_layer=cfg.n_decoder_layer)
        self.head = LMHead(cfg)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder output (B, S, D)."""
        hidden, _ = self.encoder.run(self.embed(input_ids) * self.config.embed_scale, attention_mask=attention_mask)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_positions: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """input_ids (B, S) source; decoder_input_ids (B, T) target so far; attention_mask (B, S) and
        decoder_attention_mask (B, past + T) hold 1 for real tokens; memory: a precomputed `encode`.
        cache: the decoder's self-attention keys/values, and its cross-attention keys/values of `memory`
        (projected on the first call and reused after it: one cache serves one source batch)."""
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder needs decoder_input_ids: call model(input_ids, decoder_input_ids)")
        if memory is None:
            if input_ids is None:
                raise ValueError("pass input_ids (the source) or memory (a precomputed model.encode(input_ids))")
            memory = self.encode(input_ids, attention_mask)
        x = self.embed(decoder_input_ids) * self.config.embed_scale
        hidden, aux = self.decoder.run(
            x, attention_mask=decoder_attention_mask, positions=decoder_positions, cache=cache,
            memory=memory, memory_mask=attention_mask,
        )
        out = self.head(hidden, self.embed.weight)
        out.aux_losses = aux
        return out
