"""LayerNorm and RMSNorm, chosen by `NormConfig.kind`."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import NormConfig
from lmforge.nn.kernels import cpu_kernels, use_kernel


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written out (Zhang & Sennrich 2019, eq. 4): the oracle of `rms_norm`."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference`, forward and backward, bit for bit, in fewer passes (see RMSNormFunction).
    Under torch.compile the reference itself: inductor fuses its ops, and dynamo rejects a Function that
    takes one tensor twice. Under CPU bf16 autocast the fused kernel (FusedRMSNorm), not bit for bit."""
    if torch.compiler.is_compiling():
        return rms_norm_reference(x, weight, eps)
    if _fused_applies(x, weight):
        return FusedRMSNorm.apply(x, weight, eps)
    x32 = x.float()
    return RMSNormFunction.apply(x32, x32, weight, eps, x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x_sq^2) + eps)).to(dtype), called with x_sq = x (fp32), the reference's graph
    in one node.

    The backward is the chain autograd builds from the reference's ops, with the per-row factors (..., 1)
    combined before they meet a full-size tensor: with r = rsqrt(mean(x^2) + eps) and u = g w,
        dL/dx = u r  +  x * 2 (-1/2 sum_d(u x) r^3 / D)
    where autograd also materialises the mean's expanded gradient, x.pow(1) and 2 x. p * (2 x) == (2 p) * x
    exactly (doubling is exact), so the numbers do not change. x comes in twice because the reference uses
    it twice (in x * r and in x^2): autograd adds the two terms above into x's gradient one after the
    other, after whatever gradient x already holds (the residual stream's), and a single summed gradient
    would round differently. tests/nn/test_norms_mlp.py checks the bitwise identity, in a residual block too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_sq: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype):
        r = torch.rsqrt(x_sq.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        normed = (x * r).to(dtype)
        ctx.save_for_backward(x, weight, r, normed)
        return weight * normed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, r, normed = ctx.saved_tensors
        grad_x = grad_x_sq = grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad * normed).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_normed = (grad * weight).to(normed.dtype).to(x.dtype)  # the reference's casts, in reverse
            grad_x = grad_normed * r
            grad_r = (grad_normed * x).sum(-1, keepdim=True)  # (..., 1)
            grad_mean = -0.5 * grad_r * r.pow(3)  # rsqrt's backward
            grad_x_sq = x * (2 * (grad_mean / x.shape[-1]))  # mean's, then pow's backward
        return grad_x, grad_x_sq, grad_weight, None, None


def _fused_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused kernel serves fp32 residual streams under CPU bf16 autocast, where the output is rounded to
    bf16 by the next matmul anyway; fp32 runs keep the bit-exact path above."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype == torch.float32
            and weight.dtype == torch.float32 and use_kernel("rms_norm"))


class FusedRMSNorm(torch.autograd.Function):
    """`rms_norm_reference` on fp32 x and weight as one pass forward and one backward (lmforge/nn/kernels/cpu.c),
    saving x and the per-row rsqrt: the same formula, summed in another order (within a few fp32 ulp)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = cpu_kernels().rms_norm_fwd(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = cpu_kernels().rms_norm_bwd(rows, weight.contiguous(), rstd,
                                                    grad.reshape(rows.shape).float().contiguous())
        return grad_x.view(grad.shape), grad_w, None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4): x / rms(x) * g, no mean subtraction.

    Computed in fp32 and cast back, as Llama and T5 do, so bf16 runs keep a stable denominator.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _layer_norm(dim: int, cfg: NormConfig) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.eps, bias=cfg.bias)


def _rms_norm(dim: int, cfg: NormConfig) -> nn.Module:
    return RMSNorm(dim, eps=cfg.eps)


NORMS = {"layer": _layer_norm, "rms": _rms_norm}


def make_norm(dim: int, cfg: NormConfig) -> nn.Module:
    if cfg.kind not in NORMS:
        raise ValueError(f"norm kind {cfg.kind!r} is unknown; valid kinds: {sorted(NORMS)}")
    return NORMS[cfg.kind](dim, cfg)
