"""What a model call returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted; add them to the loss
