"""Quantised linear layers: the fused CPU kernels against the dequantise-then-matmul reference, and the
quantised layers against full precision.

Tolerances (relative Frobenius error of the outputs, random N(0, 1) activations, default nn.Linear init):
- kernel vs reference: < 1% (measured ~0.3%): the kernels see bf16 activations and bf16 scales;
- int8 vs fp32: < 1% (measured ~0.4%);
- int4 (groups of 64) vs fp32: < 10% (measured ~6.5%; 4 bits leave 16 levels per group).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.nn.quant import (
    Int4Linear,
    Int8Linear,
    _decode_cpu_layout,
    empty_quantized_linear,
    int4_cpu_layout,
    pack_int4,
    quantize_linear,
    unpack_int4,
)

needs_int4_kernel = pytest.mark.skipif(int4_cpu_layout() is None, reason="this torch build has no CPU int4 kernel")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear(in_features: int, out_features: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def acts(in_features: int, seed: int = 1, shape: tuple[int, ...] = (2, 5)) -> torch.Tensor:
    return torch.randn(*shape, in_features, generator=torch.Generator().manual_seed(seed))


@needs_int4_kernel
def test_int4_kernel_dequantises_as_q_minus_8_times_scale_plus_zero():
    """The convention everything else relies on: W = (q - 8) * scale + zero, scales_and_zeros (N, O, 2)."""
    n_out, n_in, G = 32, 128, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n_out, n_in), generator=g, dtype=torch.int32)
    scale, zero = torch.rand(n_in // G, n_out, generator=g) + 0.5, torch.randn(n_in // G, n_out, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    x = torch.randn(3, n_in, generator=g).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, torch.stack([scale, zero], -1).bfloat16())
    w = (q - 8) * scale.t().bfloat16().float().repeat_interleave(G, 1) + zero.t().bfloat16().float().repeat_interleave(
        G, 1)
    assert rel(y, x.float() @ w.t()) < 5e-3


@needs_int4_kernel
@pytest.mark.parametrize("out_features", [16, 48, 64, 112, 160, 256])
def test_cpu_int4_layout_decodes_exactly(out_features):
    """Full blocks and tail blocks of the kernel's packing decode back to the same integers."""
    q = torch.randint(0, 16, (out_features, 96), generator=torch.Generator().manual_seed(out_features),
                      dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    assert torch.equal(_decode_cpu_layout(packed, out_features, *int4_cpu_layout()).int(), q)


def test_portable_int4_packing_round_trips():
    q = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # low nibble first


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(64, 128), (48, 96), (112, 256), (64, 100)])
def test_kernel_matches_reference(bits, shape):
    out_features, in_features = shape
    layer = quantize_linear(linear(in_features, out_features), bits)
    x = acts(in_features)
    y, ref = layer(x), layer.reference(x)
    assert y.shape == ref.shape == (2, 5, out_features) and y.dtype == x.dtype
    if layer.uses_kernel:
        err = rel(y, ref)
        assert err < 1e-2, f"{type(layer).__name__} {shape}: kernel vs reference relative error {err:.4f}"
        assert 0 < err, "the kernel path was not taken (identical to the reference)"
    else:
        assert torch.equal(y, ref)


@pytest.mark.parametrize("bits, bound", [(8, 0.01), (4, 0.10)])
def test_quantised_output_close_to_full_precision(bits, bound):
    lin = linear(256, 128)
    x = acts(256)
    err = rel(quantize_linear(lin, bits)(x), lin(x))
    assert err < bound, f"int{bits} vs fp32 relative output error {err:.4f} > {bound}"


def test_int4_smaller_groups_are_more_accurate():
    lin, x = linear(256, 64), acts(256)
    errors = [rel(Int4Linear.from_linear(lin, group_size=g).reference(x), lin(x)) for g in (32, 64, 128, 256)]
    assert errors == sorted(errors), errors


def test_int8_weight_error_is_at_most_half_a_step():
    lin = linear(64, 32)
    layer = Int8Linear.from_linear(lin)
    err = (layer.dequantize() - lin.weight).abs()
    assert (err <= layer.scale[:, None] / 2 + 1e-7).all()
    assert layer.qweight.abs().max() == 127  # absmax maps each row's largest weight to +-127


def test_int4_weight_error_is_about_half_a_step():
    lin = linear(128, 32)
    layer = Int4Linear.from_linear(lin, group_size=32)
    scale = layer.scales_and_zeros[..., 0].float().t().repeat_interleave(32, 1)  # (O, I)
    err = (layer.dequantize() - lin.weight).abs()
    assert (err <= 0.51 * scale + 1e-6).all(), (err / scale).max()


def test_bias_stays_full_precision():
    lin = linear(64, 32)
    for bits in (8, 4):
        assert torch.equal(quantize_linear(lin, bits).bias, lin.bias)
    assert quantize_linear(linear(64, 32, bias=False), 8).bias is None


def test_shapes_the_kernels_reject_fall_back_to_the_reference():
    int8 = Int8Linear.from_linear(linear(40, 32))  # in_features % 16 != 0
    int4 = Int4Linear.from_linear(linear(64, 17))  # out_features % 16 != 0
    assert not int8.uses_kernel and not int4.uses_kernel
    for layer, n_in in ((int8, 40), (int4, 64)):
        x = acts(n_in)
        assert torch.equal(layer(x), layer.reference(x))
    padded = Int4Linear.from_linear(linear(100, 32), group_size=32)  # in_features padded to 128
    assert padded.padded_in == 128 and padded.uses_kernel == (int4_cpu_layout() is not None)


def test_misaligned_bf16_input_is_safe():
    """The int8 AVX512 kernel uses aligned loads: a bf16 view at an odd offset must be copied, not crash."""
    layer = Int8Linear.from_linear(linear(64, 32))
    buf = torch.randn(3 * 64 + 1).bfloat16()
    x = buf[1:].view(3, 64)
    assert rel(layer(x), layer.reference(x.float())) < 1e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip_is_exact_and_portable(bits):
    layer = quantize_linear(linear(128, 64), bits, group_size=32)
    state = layer.state_dict()
    if bits == 4:  # on disk: the portable nibble layout, whatever the kernel packs in memory
        assert torch.equal(state["qweight"], pack_int4(layer.int4_values()))
        assert state["scales_and_zeros"].shape == (4, 64, 2)
    fresh = empty_quantized_linear(128, 64, True, bits, group_size=32)
    fresh.load_state_dict(state)
    x = acts(128)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_bad_arguments_name_the_constraint():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_linear(linear(64, 32), 3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Linear(64, 32, group_size=16)
