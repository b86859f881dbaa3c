"""Position-wise feed-forward networks: plain (ReLU/GELU) and gated (SwiGLU/GeGLU)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import MLPConfig
from lmforge.nn.kernels import cpu_kernels, use_kernel

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact erf form (BERT)
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's approximation
    "silu": F.silu,  # Swish-1; with gating this is SwiGLU (Shazeer 2020)
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is unknown; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """down(act(up(x))): the Transformer's FFN (Vaswani et al. 2017, eq. 2)."""

    def __init__(self, d_model: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.act = activation(cfg.activation)
        self.fused_act = cfg.activation == "gelu_tanh"  # the activation lmforge.nn.kernels computes
        self.up = nn.Linear(d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.fused_act and _fused_applies(h, "gelu_tanh"):
            return self.down(FusedGeluTanh.apply(h))
        return self.down(self.act(h))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): GLU variants (Shazeer 2020, eq. 6), SwiGLU with silu."""

    def __init__(self, d_model: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.act = activation(cfg.activation)
        self.gate = nn.Linear(d_model, cfg.d_ff, bias=cfg.bias)
        self.up = nn.Linear(d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # autocast caches the casts of weights only: x (fp32 from the norm) would be cast for gate and
            # again for up, and both casts' gradients added back; one cast gives the same numbers
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gate, up = self.gate(x), self.up(x)
        if self.act is F.silu and _fused_applies(gate, "swiglu") and up.dtype == gate.dtype and up.shape == gate.shape:
            return self.down(FusedSwiGLU.apply(gate, up))
        return self.down(self.act(gate) * up)


def _fused_applies(h: torch.Tensor, kernel: str) -> bool:
    """bf16 activations on the CPU take lmforge.nn.kernels' fused activations (fp32 keeps torch's ops)."""
    return (h.device.type == "cpu" and h.dtype == torch.bfloat16 and not torch.compiler.is_compiling()
            and use_kernel(kernel))


class FusedGeluTanh(torch.autograd.Function):
    """F.gelu(h, approximate="tanh") on bf16 CPU tensors in one pass each way (lmforge/nn/kernels/cpu.c), tanh
    through exp in fp32 (within a few fp32 ulp), rounded to bf16 once, as torch's kernel does."""

    @staticmethod
    def forward(ctx, h: torch.Tensor):
        h = h.contiguous()
        ctx.save_for_backward(h)
        return cpu_kernels().gelu_tanh_fwd(h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        return cpu_kernels().gelu_tanh_bwd(h, grad.to(h.dtype).contiguous())


class FusedSwiGLU(torch.autograd.Function):
    """silu(gate) * up on bf16 CPU tensors in one pass each way (lmforge/nn/kernels/cpu.c), computed in fp32 and
    rounded once (the unfused ops round silu(gate) to bf16 first). Saves gate and up, not silu(gate)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return cpu_kernels().swiglu_fwd(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return cpu_kernels().swiglu_bwd(gate, up, grad.to(gate.dtype).contiguous())


def make_mlp(d_model: int, cfg: MLPConfig) -> nn.Module:
    return (GatedMLP if cfg.gated else MLP)(d_model, cfg)
