"""What sits on top of the last hidden state, chosen by `cfg.head`.

lm: vocabulary logits (tied to the token embedding or not; BERT's MLM transform; T5's input scale)
sequence_classification: BERT's pooler (dense + tanh over the first token) then a linear classifier
token_classification: a linear classifier per token
none: the hidden states themselves (and the pooled first token when the model has a pooler)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.output import ModelOutput
from lmforge.nn.mlp import activation
from lmforge.nn.norms import make_norm


class Pooler(nn.Module):
    """BERT's pooler: tanh(W h_0 + b) over the first ([CLS]) token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Transform(nn.Module):
    """BERT's MLM transform: norm(act(W h + b))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation(cfg.mlp.activation)
        self.norm = make_norm(cfg.d_model, cfg.norm)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class LMHead(nn.Module):
    # the tied projection's matmul; nn.packed.use_onednn_linears points it at onednn_linear (same math)
    linear = staticmethod(F.linear)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.scale = cfg.head_input_scale
        self.transform = Transform(cfg) if cfg.head_transform else nn.Identity()
        self.proj = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.padded_vocab_size)) if cfg.lm_head_bias else None

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> ModelOutput:
        scaled = hidden if self.scale == 1.0 else hidden * self.scale  # x * 1.0 == x: skip a pass and its backward
        x = self.transform(scaled)
        if self.proj is None:
            logits = self.linear(x, embedding, self.bias)
        else:  # called as a module, so a quantised projection (models/quantize.py) runs its own kernel
            logits = self.proj(x) if self.bias is None else self.proj(x) + self.bias
        return ModelOutput(logits=logits[..., : self.vocab_size], hidden=hidden)


class SequenceClassificationHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.n_labels)

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> ModelOutput:
        pooled = self.pooler(hidden) if self.pooler is not None else hidden[:, 0]
        return ModelOutput(logits=self.classifier(self.drop(pooled)), hidden=hidden, pooled=pooled)


class TokenClassificationHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.n_labels)

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.classifier(self.drop(hidden)), hidden=hidden)


class NoHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pooler = Pooler(cfg) if cfg.pooler else None

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> ModelOutput:
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return ModelOutput(logits=None, hidden=hidden, pooled=pooled)


HEADS = {
    "lm": LMHead,
    "sequence_classification": SequenceClassificationHead,
    "token_classification": TokenClassificationHead,
    "none": NoHead,
}


def make_head(cfg: ModelConfig) -> nn.Module:
    if cfg.head not in HEADS:
        raise ValueError(f"head {cfg.head!r} is unknown; valid heads: {sorted(HEADS)}")
    return HEADS[cfg.head](cfg)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """Sentence embedding: the mean of the real tokens' hidden states (B, T, D) -> (B, D), L2-normalised
    by default (sentence-transformers' mean pooling + Normalize)."""
    if attention_mask is None:
        pooled = hidden.mean(dim=1)
    else:
        weights = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
