"""AdamW with decay / no-decay parameter groups, and gradient clipping that reports non-finite norms.

Weight decay (decoupled, Loshchilov & Hutter 2019) goes on the matrices that multiply activations:
linear weights, MoE expert weights, an untied LM head. It stays off biases, norm gains, other 1-D
parameters and embedding tables (token, learned position, relative-position bias). nanoGPT decays
embeddings too (every tensor with ndim >= 2); for embeddings we follow OLMo 2 (`decay_embeddings: false`
in allenai/OLMo `configs/official-1124/OLMo2-7B-stage1.yaml`, which does decay norms and biases, unlike
nanoGPT, HF Trainer and us). Why: decoupled decay shrinks every row every step, but a row's gradient
is non-zero only when its token occurs, so rare tokens' rows would decay towards zero. A head tied to
the token embedding is that embedding, so it is not decayed either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    """AdamW settings.

    lr: peak learning rate (the schedule multiplies it each step).
    weight_decay: decoupled decay for the "decay" group (matrices); the "no_decay" group gets 0.
    betas, eps: Adam's moment decay rates and denominator epsilon (Kingma & Ba 2015, Algorithm 1).
    grad_clip: max global L2 norm of the gradients; 0 disables clipping (the norm is still measured).
    fused: use the fused AdamW kernel; None picks it when every parameter's device supports it.
    """

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML and CLI overrides give lists
        if not self.lr > 0:
            raise ValueError(f"optimizer lr must be > 0: got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0: got {self.weight_decay}; use 0 to disable it")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1): got {self.betas}; (0.9, 0.95) is common")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0: got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0: got {self.grad_clip}; use 0 to disable clipping")


def _embedding_params(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a "decay" group (ndim >= 2, not an embedding table) and a
    "no_decay" group (everything else). Each parameter lands in exactly one group, shared (tied) ones
    once; empty groups are left out."""
    embeddings = _embedding_params(model)
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    # torch's own list of devices with a fused AdamW kernel (cuda, cpu, xpu, mps, ...); private, so guarded.
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda"}
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters; unfreeze some before building the optimizer")
    params = [p for g in groups for p in g["params"]]
    fused = _fused_supported(params) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def clip_grad_norm(model_or_params: nn.Module | Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most `max_norm` (0: measure only) and return
    the norm before clipping.

    Never raises on a non-finite norm: it returns inf / nan so the caller (see `guard.NonFiniteGuard`)
    can skip the step; the gradients are then not meaningful and must be zeroed, not applied.
    """
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    limit = max_norm if max_norm > 0 else math.inf  # inf: the clip coefficient clamps to 1, a no-op
    norm = torch.nn.utils.clip_grad_norm_(grads, limit, error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor whose local value is only this rank's shard
        norm = norm.full_tensor()
    return float(norm)
