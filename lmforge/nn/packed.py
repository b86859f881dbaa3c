"""Linear layers with their weight pre-packed for oneDNN: faster CPU inference, same math.

    pack_for_cpu(model)        # in place: every nn.Linear -> PackedLinear; returns the model in eval mode

`F.linear` on CPU hands a row-major (O, I) weight to a GEMM that re-reads it in the layout it needs on
every call. oneDNN can reorder the weight once into its blocked layout (`torch.ops.mkldnn.
_reorder_linear_weight`, what torch.compile's CPU "freezing" pass does) and then run `_linear_pointwise`
on it. Measured here (2 threads, fp32): a decode step's chain of batch-1 matrix-vector products for a
6-layer, 384-wide model runs in 1.8 ms instead of 3.8 ms, and a (256 x 384) @ (384 x 2048) product in
0.94 ms instead of 2.5 ms; bf16 gains alike. The result equals `F.linear` up to float reassociation
(tests: relative 1e-6 in fp32).

Inference only: the packed weight is an opaque oneDNN tensor, not a Parameter, so it takes no gradient
and follows no `.to()`: pack after moving the model to its dtype and device. `state_dict()` still holds
the plain (O, I) `weight` (unpacked on the way out), so a packed model saves like any other.

Training on oneDNN (recipe `train.matmul`: `auto`, the default, picks it for CPU runs; `resolve_matmul`):

    use_onednn_linears(model)  # in place: every linear map of the model runs forward and backward on oneDNN GEMMs

On AMD CPUs PyTorch's fp32 `F.linear` goes to MKL, which runs a non-AVX-512 code path there; oneDNN's
`_linear_pointwise` on the plain (O, I) weight runs the same fp32 GEMM 2-3x faster. Measured on this
machine (AMD EPYC Zen 5, 2 threads, x (2048, 384), W (1152, 384)): forward 24 -> 8.0 ms, input gradient
31 -> 8.0 ms, weight gradient 30 -> 11 ms; same fp32 arithmetic, results differ from MKL's by summation
order only (relative ~1e-6). `onednn_linear` is the differentiable op. The swap changes each nn.Linear's
class, and points the `linear` attribute of modules that apply a raw weight themselves (the tied LM head,
`models/heads.py`; the stacked MoE experts, `nn/moe.py`) at `onednn_linear`; parameters, names and
state_dict stay as they were, so checkpoints see the same module tree, and DDP / FSDP2 wrap it as usual.

Under torch.compile the GEMM is the opaque custom op `lmforge::onednn_gemm`: inductor's own lowering of
`_linear_pointwise` only accepts a frozen (constant) weight and fails on a trained one, so the op is
hidden from it and called as is, with the elementwise code around it still fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's blocked layout (CPU, fp32 or bf16)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"oneDNN packing needs a CPU fp32 or bf16 weight, got {weight.dtype} on {weight.device}; "
                             "pack_for_cpu skips such layers")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # (O, I), opaque blocked layout
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """The plain (O, I) weight."""
        return self.packed.to_dense()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear on the unpacked weight: the oracle."""
        return F.linear(x, self.dense_weight(), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()

    def __deepcopy__(self, memo):
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.dense_weight().clone(), requires_grad=False)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return PackedLinear(plain)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.packed.dtype}")


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Swap every CPU fp32 / bf16 `nn.Linear` of `model` for a `PackedLinear`, in place; returns the model in
    eval mode. A no-op where oneDNN is missing; layers on other devices or dtypes are left as they are."""
    if not packing_available():
        return model.eval()
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear
               and m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.bfloat16)]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PackedLinear(linear))
    return model.eval()


# -- training: differentiable oneDNN linear ---------------------------------------------------------------

@torch.library.custom_op("lmforge::onednn_gemm", mutates_args=())
def _gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ b.T + bias with oneDNN: a (..., K), b (N, K), bias (N,) or None -> (..., N); strided (e.g.
    transposed) views are read in place. A custom op so torch.compile calls it rather than lowering it."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@_gemm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[0]))  # contiguous, as oneDNN writes it


class _OneDNNLinearFn(torch.autograd.Function):
    """y = x W^T + b (forward) and its three gradients, each one oneDNN GEMM (or a sum):
    dx = g W, dW = g^T x (leading dims flattened), db = sum of g over the leading dims.
    Passing transposed views (W.t(), g.t(), x.t()) measured faster than making them contiguous first."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _gemm(x, weight, bias)  # (..., O)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _gemm(grad, weight.t(), None) if need_x else None  # (..., O) @ (O, I) -> (..., I)
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (M, O)
        grad_w = _gemm(grad_2d.t(), x.reshape(-1, x.shape[-1]).t(), None) if need_w else None  # (O, M) @ (M, I)
        grad_b = grad_2d.sum(0) if need_b else None  # (O,)
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed with oneDNN GEMMs in forward and backward (CPU, fp32 or bf16).

    x (..., I), weight (O, I), bias (O,) or None -> (..., O). Under CPU autocast the inputs are cast to the
    autocast dtype here, as autocast does for `F.linear` (a custom op is on none of its lists); the casts are
    ordinary autograd ops, so gradients reach the parameters in their own dtype."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"onednn_linear runs on the CPU only, got x on {x.device} and weight on {weight.device}; "
                         "use F.linear (train.matmul: aten) on other devices")
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"onednn_linear needs x and weight of one dtype, fp32 or bf16; got {x.dtype} and "
                        f"{weight.dtype}: cast them, or run under torch.autocast('cpu', dtype=torch.bfloat16)")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"onednn_linear: bias is {bias.dtype} but x is {x.dtype}; cast the bias to {x.dtype}")
    with torch.autocast("cpu", enabled=False):  # inputs are cast already; no autocast inside the op
        return _OneDNNLinearFn.apply(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose forward (and so backward) runs on oneDNN; same parameters and state_dict.
    Made by `use_onednn_linears`, which swaps the class of existing layers rather than building new ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Run every linear map of `model` on oneDNN, in place, and return the model: each plain `nn.Linear`
    (the untied LM head's projection included) becomes an `OneDNNLinear`, and each module whose `linear`
    attribute is `F.linear` (the tied LM head, MoE experts: modules that apply a raw weight) gets
    `onednn_linear` there. Parameters, their names and the state_dict are untouched, so it may run before or
    after loading a checkpoint and before DDP / FSDP2 wrapping or torch.compile.
    Not covered: quantised or packed layers, and subclasses of nn.Linear, which keep their own forward."""
    if not packing_available():
        raise ValueError("use_onednn_linears: this PyTorch build has no oneDNN (torch.backends.mkldnn) ops; "
                         "train with train.matmul: aten")
    elsewhere = [f"{name} ({p.device})" for name, p in model.named_parameters() if p.device.type != "cpu"]
    if elsewhere:
        raise ValueError(f"use_onednn_linears: oneDNN GEMMs run on the CPU, but {', '.join(elsewhere[:3])} "
                         "are not; move the model to the CPU or train with train.matmul: aten")
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
        elif getattr(module, "linear", None) is F.linear:
            module.linear = onednn_linear
    return model


def resolve_matmul(matmul: str, device: torch.device, precision: str) -> str:
    """The recipe's `train.matmul` made concrete: "aten" or "onednn".

    auto: oneDNN for fp32 CPU runs where this build has its ops (training steps 1.5-1.7x faster on this AMD CPU,
    bench/train_throughput.py), aten elsewhere: GPUs, and bf16 autocast, where aten's CPU matmul already calls
    oneDNN and its training steps measured 5-10% faster than with `onednn_linear`. onednn: CPU, fp32 or bf16."""
    if matmul == "auto":
        return "onednn" if device.type == "cpu" and precision == "fp32" and packing_available() else "aten"
    if matmul == "onednn" and device.type != "cpu":
        raise ValueError(f"train.matmul=onednn runs on the CPU, but this run is on {device}; "
                         "use train.matmul=auto or aten (or train.device=cpu)")
    if matmul == "onednn" and precision not in ("fp32", "bf16"):
        raise ValueError(f"train.matmul=onednn computes in fp32 or bf16, not train.precision={precision}; "
                         "use train.matmul=auto or aten")
    if matmul == "onednn" and not packing_available():
        raise ValueError("train.matmul=onednn: this PyTorch build has no oneDNN (torch.backends.mkldnn) ops; "
                         "use train.matmul=auto or aten")
    return matmul
