"""What a model call returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V) for LM heads, (B, n_labels) / (B, T, n_labels) for classifiers
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted; add them to the loss
    hidden: torch.Tensor | None = None  # (B, T, D) last hidden state, after the final norm
    pooled: torch.Tensor | None = None  # (B, D) pooler output, where the model has one
