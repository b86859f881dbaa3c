"""LayerNorm and RMSNorm, chosen by `NormConfig.kind`."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import NormConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4): x / rms(x) * g, no mean subtraction.

    Computed in fp32 and cast back, as Llama and T5 do, so bf16 runs keep a stable denominator.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _layer_norm(dim: int, cfg: NormConfig) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.eps, bias=cfg.bias)


def _rms_norm(dim: int, cfg: NormConfig) -> nn.Module:
    return RMSNorm(dim, eps=cfg.eps)


NORMS = {"layer": _layer_norm, "rms": _rms_norm}


def make_norm(dim: int, cfg: NormConfig) -> nn.Module:
    if cfg.kind not in NORMS:
        raise ValueError(f"norm kind {cfg.kind!r} is unknown; valid kinds: {sorted(NORMS)}")
    return NORMS[cfg.kind](dim, cfg)
