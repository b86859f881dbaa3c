"""Weight-only quantised linear layers: int8 per output channel, int4 group-wise with zero points.

Activations stay in floating point; only the weight matrix is stored in fewer bits. Each layer has two
forward paths that must agree (tests/nn/test_quant.py):
- `forward`: PyTorch's fused CPU weight-only kernels (`torch._weight_int8pack_mm`,
  `torch.ops.aten._weight_int4pack_mm_for_cpu`), which read the small integer weights directly;
- `reference`: dequantise the whole weight to the activation dtype, then an ordinary `F.linear`.
  Slow and obviously right: the oracle.

Honest notes on the fast path. The kernels are fast only with bfloat16 activations (measured on a 2-core
AVX512 CPU, a 16384x4096 weight and one token: int8 2.5 ms with bf16 input vs 22 ms with fp32 input;
int4 1.6 ms vs 52 ms; fp32 F.linear 12.5 ms), so `forward` casts activations to bf16 for the kernel
and the result back: expect bf16-level differences (~0.5% relative) from `reference`. The kernels
accumulate in fp32. Layers whose shapes the kernels reject run the reference path (`uses_kernel` says
which): int8 needs in_features % 16 == 0 (the AVX512 kernel does aligned 16-wide loads; other sizes read
out of bounds), int4 needs out_features % 16 == 0. The kernels run on CPU tensors only; elsewhere the
reference path runs.

Legend: O out_features, I in_features, I_p in_features padded up to a multiple of the group size,
G group size, N = I_p / G groups, M rows of activations.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x (..., I) -> (M, I) bf16, contiguous and 64-byte aligned (the int8 AVX512 kernel uses aligned
    loads and crashes on a misaligned view)."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    return x2 if x2.data_ptr() % 64 == 0 else x2.clone()


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 and one scale per output channel.

    Quantisation is absmax (Dettmers et al. 2022, LLM.int8(), eq. 1) applied per row of W, i.e. per
    output channel (their vector-wise quantisation): s_o = max_i |W_oi| / 127, q_oi = round(W_oi / s_o)
    in [-127, 127], and W_oi ~ q_oi * s_o. Unlike LLM.int8() there is no mixed-precision decomposition
    for outlier features and activations are not quantised: this is weight-only quantisation.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))  # (O, I)
        self.register_buffer("scale", torch.empty(out_features))  # (O,) fp32
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.uses_kernel = in_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()  # (O, I)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None).to(w.device)
        scale = w.abs().amax(dim=1) / 127  # (O,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row quantises to zeros
        layer.qweight.copy_(torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight the integers stand for, (O, I) fp32."""
        return self.qweight.float() * self.scale.float()[:, None]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantise-then-matmul in the activation dtype (the oracle)."""
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel or x.device.type != "cpu" or self.qweight.data_ptr() % 64:
            return self.reference(x)
        y = torch._weight_int8pack_mm(_kernel_input(x), self.qweight, self.scale.to(torch.bfloat16))  # (M, O)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.uses_kernel}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Portable layout: (O, I) values in [0, 15] -> (O, I / 2) uint8, byte j = q[:, 2j] | q[:, 2j+1] << 4."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (O, I / 2) uint8 -> (O, I) uint8 in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def _decode_cpu_layout(packed: torch.Tensor, out_features: int, block_n: int, halves: bool) -> torch.Tensor:
    """Undo `_convert_weight_to_int4pack_for_cpu` (aten/src/ATen/native/cpu/int4mm_kernel.cpp,
    `weight_to_int4pack_kernel`): rows are cut into blocks of `block_n` (64 on AVX512, 32 on AVX2 and the
    plain build); block b is stored as (I, block_n / 2) bytes. In a full block with `halves` (the AVX2 /
    AVX512 formats) the low nibbles hold rows 0..block_n/2-1 and the high nibbles the rest; otherwise
    (the plain format, and every shorter tail block) byte j holds rows 2j (low) and 2j + 1 (high).
    (O, I_p / 2) uint8 -> (O, I_p) uint8 in [0, 15]."""
    flat = packed.reshape(-1)
    n_in = flat.numel() * 2 // out_features
    full = out_features // block_n
    rows = []
    if full:
        blocks = flat[: full * block_n * n_in // 2].view(full, n_in, block_n // 2)  # (B, I_p, block_n / 2)
        lo, hi = blocks & 15, blocks >> 4
        values = torch.cat([lo, hi], -1) if halves else torch.stack([lo, hi], -1).flatten(-2)  # (B, I_p, block_n)
        rows.append(values.transpose(1, 2).reshape(full * block_n, n_in))
    tail = out_features - full * block_n
    if tail:
        t = flat[full * block_n * n_in // 2:].view(n_in, tail // 2)  # (I_p, tail / 2)
        rows.append(torch.stack([t & 15, t >> 4], -1).flatten(-2).t())
    return torch.cat(rows)


@functools.cache
def int4_cpu_layout() -> tuple[int, bool] | None:
    """Which of the documented layouts this build's int4 packing writes, found by packing a probe once:
    (block_n, halves), or None when the op is missing or writes none of them (the reference path then
    runs). The probe has a full block and a tail for every candidate block size."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    probe = torch.randint(0, 16, (112, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = convert(probe, 2)
    except RuntimeError:
        return None
    for block_n in (64, 32, 16, 8):
        for halves in (True, False):
            if torch.equal(_decode_cpu_layout(packed, 112, block_n, halves).int(), probe):
                return block_n, halves
    return None


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as 4-bit integers, one scale and one zero point per group of G inputs.

    Group-wise asymmetric min-max quantisation, the format of gpt-fast (`quantize.py`,
    `get_group_qparams` / `group_quantize_tensor`) and of GPTQ checkpoints (Frantar et al. 2023, grouped
    weights with zero points), in the convention PyTorch's int4 kernels dequantise with:

        W_oi ~ (q_oi - 8) * s_og + z_og,   g = i // G,   q in [0, 15],
        s = (max - min) / 15,   z = min + 8 s   (so q = 0 maps to the group's min, q = 15 to its max).

    The weights are rounded to nearest: no GPTQ error compensation and no calibration data. Scales and
    zeros are stored in bf16 (what the kernel reads) and q is computed against those rounded values.
    in_features that are not a multiple of G are padded with zero columns (and activations with zeros
    on the kernel path), so every layer can be quantised.

    Storage: `qweight` (O, I_p / 2) uint8 holds two values per byte. In `state_dict()` (and on disk) it is
    always the portable layout of `pack_int4`; in memory, when the kernel runs, it is the kernel's own
    packing, converted on load (`_load_from_state_dict`) and back on save (`_save_to_state_dict`), the
    way torch.ao's quantised Linear keeps its packed parameters.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64) -> None:
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES} (the kernel's), got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = -(-in_features // group_size) * group_size  # I_p
        n_groups = self.padded_in // group_size
        self.register_buffer("qweight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(n_groups, out_features, 2, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.layout = int4_cpu_layout() if out_features % 16 == 0 else None  # None: portable, reference path
        self.uses_kernel = self.layout is not None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group_size)
        w = linear.weight.detach().float()  # (O, I)
        n_out, G = layer.out_features, group_size
        w = F.pad(w, (0, layer.padded_in - layer.in_features)).view(n_out, -1, G)  # (O, N, G)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (O, N)
        scale = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()  # a constant group gets a tiny step
        zero = (lo + 8 * scale).bfloat16().float()
        q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)  # (O, N, G)
        layer.scales_and_zeros.copy_(torch.stack([scale, zero], dim=-1).transpose(0, 1))  # (N, O, 2)
        layer.qweight.copy_(layer._to_memory_layout(pack_int4(q.view(n_out, -1))))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer.to(linear.weight.device)

    def _to_memory_layout(self, portable: torch.Tensor) -> torch.Tensor:
        if self.layout is None:
            return portable
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(portable.cpu()).int(), 2)

    def int4_values(self) -> torch.Tensor:
        """The stored integers, (O, I_p) uint8 in [0, 15], whatever the memory layout."""
        if self.layout is None:
            return unpack_int4(self.qweight)
        return _decode_cpu_layout(self.qweight, self.out_features, *self.layout)

    def dequantize(self) -> torch.Tensor:
        """The weight the integers stand for, (O, I) fp32 (padding columns dropped)."""
        q = self.int4_values().float().view(self.out_features, -1, self.group_size)  # (O, N, G)
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (O, N) each
        w = (q - 8) * scale[..., None] + zero[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantise-then-matmul in the activation dtype (the oracle)."""
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel or x.device.type != "cpu":
            return self.reference(x)
        x2 = _kernel_input(x)  # (M, I) bf16
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))  # (M, I_p)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout is not None:
            destination[prefix + "qweight"] = pack_int4(self.int4_values())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        if key in state_dict and state_dict[key].shape == self.qweight.shape:
            state_dict[key] = self._to_memory_layout(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, kernel={self.uses_kernel}")


QUANTIZED_LINEARS: dict[int, type[nn.Module]] = {8: Int8Linear, 4: Int4Linear}


def quantize_linear(linear: nn.Linear, bits: int, group_size: int = 64) -> nn.Module:
    """nn.Linear -> Int8Linear (bits=8) or Int4Linear (bits=4, groups of `group_size` inputs)."""
    if bits == 8:
        return Int8Linear.from_linear(linear)
    if bits == 4:
        return Int4Linear.from_linear(linear, group_size=group_size)
    raise ValueError(f"bits must be one of {sorted(QUANTIZED_LINEARS)} (weight-only int8 / int4), got {bits}")


def empty_quantized_linear(in_features: int, out_features: int, bias: bool, bits: int,
                           group_size: int = 64) -> nn.Module:
    """An uninitialised quantised layer of the given shape, to load a saved state into."""
    if bits == 8:
        return Int8Linear(in_features, out_features, bias=bias)
    if bits == 4:
        return Int4Linear(in_features, out_features, bias=bias, group_size=group_size)
    raise ValueError(f"bits must be one of {sorted(QUANTIZED_LINEARS)} (weight-only int8 / int4), got {bits}")
