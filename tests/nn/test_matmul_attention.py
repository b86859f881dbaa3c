"""MatmulAttention, the CPU bf16 fast path of the sdpa backend: forward and backward against the eager
reference (float64, every mask case), its gradient against finite differences, dropout against the formula
with the same mask, its bf16 error against torch's flash kernel's, and when `sdpa_attention` takes it.

Shapes: B batch, H query heads, K key/value heads, T queries, S keys, D head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.nn import attention
from lmforge.nn.attention import (
    AttentionMask,
    MatmulAttention,
    build_attention_mask,
    dropout_keep,
    eager_attention,
    matmul_attention,
    sdpa_attention,
)
from tests.nn.test_attention import KV_HEADS, MASK_CASES, _mask_for

H, D = 8, 16


def _qkv(B, K, T, S, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, K, S, D), (B, K, S, D)]
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for shape in shapes]


def _grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize("n_kv_head", KV_HEADS, ids=lambda k: f"kv{k}")
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_matches_eager_forward_and_backward_in_float64(case, n_kv_head):
    B = 3
    mask, T, S, _ = _mask_for(MASK_CASES[case], B)
    mask = AttentionMask(bias=None if mask.bias is None else mask.bias.double(), is_causal=mask.is_causal)
    q, k, v = _qkv(B, n_kv_head, T, S)
    grad_out = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _grads(lambda q, k, v: eager_attention(q, k, v, mask, D**-0.5), q, k, v, grad_out)
    got = _grads(lambda q, k, v: matmul_attention(q, k, v, mask, D**-0.5), q, k, v, grad_out)
    for name, r, g in zip(("output", "dq", "dk", "dv"), ref, got):
        assert g.shape == r.shape and torch.isfinite(g).all(), f"{case}: {name} shape {g.shape} or non-finite values"
        diff = (g - r).abs().max().item()
        assert diff < 1e-10, f"{case}, kv={n_kv_head}: {name} differs from eager attention's by {diff:.2e}"


@pytest.mark.parametrize("case", ["causal", "alibi", "causal-right-pad", "decode-step", "chunked-prefill-window-pad"])
def test_backward_matches_finite_differences(case):
    """The hand-written backward against torch.autograd.gradcheck's numerical Jacobian (float64). No case with a
    fully masked query row: there the mask's minimum absorbs the scores, so the numerical derivative is 0 while
    the analytical one (eager autograd's too) passes the gradient through the addition."""
    mask, T, S, _ = _mask_for(MASK_CASES[case], 2)
    bias = None if mask.bias is None else mask.bias.double()
    if mask.is_causal:
        bias = torch.full((T, S), torch.finfo(torch.float64).min, dtype=torch.float64).triu_(1)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, H, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in (T, S, S))
    assert torch.autograd.gradcheck(lambda q, k, v: MatmulAttention.apply(q, k, v, bias, 0.5, None, 0.0), (q, k, v))
    keep = dropout_keep((2, H, T, S), 0.3, torch.device("cpu"))  # the same check with a fixed dropout mask
    assert torch.autograd.gradcheck(lambda q, k, v: MatmulAttention.apply(q, k, v, bias, 0.5, keep, 0.3), (q, k, v))


@pytest.mark.parametrize("n_kv_head", [8, 2], ids=lambda k: f"kv{k}")
def test_dropout_matches_the_formula_with_its_mask(n_kv_head):
    """Attention dropout (Vaswani et al. 2017 §5.4; F.dropout's inverted scaling) on the probabilities, with the
    mask `dropout_keep` draws: output and gradients equal softmax(...) * keep / (1 - p) @ V written out."""
    B, p = 2, 0.3
    mask, T, S, _ = _mask_for(MASK_CASES["alibi-left-pad"], B)
    bias = mask.bias.double()
    q, k, v = _qkv(B, n_kv_head, T, S)
    grad_out = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    got = _grads(lambda q, k, v: matmul_attention(q, k, v, AttentionMask(bias=bias), D**-0.5, p), q, k, v, grad_out)
    torch.manual_seed(5)
    keep = dropout_keep((B, H, T, S), p, torch.device("cpu"))
    assert 0 < keep.sum() < keep.numel()

    def formula(q, k, v):
        groups = H // n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        probs = torch.softmax(q @ k.transpose(-2, -1) * D**-0.5 + bias, dim=-1)
        return (probs * keep / (1 - p)) @ v

    ref = _grads(formula, q, k, v, grad_out)
    for name, r, g in zip(("output", "dq", "dk", "dv"), ref, got):
        diff = (g - r).abs().max().item()
        assert diff < 1e-10, f"kv={n_kv_head}: {name} with dropout differs from the formula by {diff:.2e}"


def test_dropout_keeps_the_expected_fraction():
    keep = dropout_keep((8, 6, 256, 256), 0.1, torch.device("cpu"))
    assert abs(keep.float().mean().item() - 0.9) < 2e-3, f"kept {keep.float().mean().item():.4f}, expected 0.9"


def test_bf16_error_is_that_of_torch_flash_kernel():
    """bf16, causal, a training-sized head: errors against a float64 reference no larger than (about) those of
    torch's own CPU flash kernel, for the output and all three gradients."""
    B, K, T = 2, 4, 128
    q, k, v = _qkv(B, K, T, T, seed=3)
    q, k, v = (t.detach() for t in (q, k, v))  # unit-variance q, k: scores of about one unit, as in a trained model
    grad_out = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = AttentionMask(is_causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                 *leaves, grad_out)
    bf16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    flash = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                   *bf16, grad_out.bfloat16())
    ours = _grads(lambda q, k, v: matmul_attention(q, k, v, mask, D**-0.5), *bf16, grad_out.bfloat16())
    for name, r, f, o in zip(("output", "dq", "dk", "dv"), ref, flash, ours):
        scale = r.abs().max().item()
        err_flash, err_ours = ((x.double() - r).abs().max().item() / scale for x in (f, o))
        assert err_ours < 2e-2, f"{name}: bf16 matmul attention is {err_ours:.2e} (relative to max) from float64"
        assert err_ours < 2 * err_flash + 2e-3, \
            f"{name}: bf16 matmul attention's error {err_ours:.2e} is far above torch flash's {err_flash:.2e}"


def test_sdpa_backend_takes_the_matmul_path_exactly_where_it_should(monkeypatch):
    calls = []
    real = MatmulAttention.apply
    monkeypatch.setattr(MatmulAttention, "apply", lambda *a: calls.append(1) or real(*a))

    def took(dtype=torch.bfloat16, T=16, S=16, dropout=0.0, bias=None, causal=True):
        calls.clear()
        q, k, v = (t.detach() for t in _qkv(1, 2, T, S, dtype=dtype))
        mask = AttentionMask(bias=bias) if bias is not None else AttentionMask(is_causal=causal and T == S)
        out = sdpa_attention(q, k, v, mask, D**-0.5, dropout)
        assert out.shape == (1, H, T, D) and torch.isfinite(out).all()
        return bool(calls)

    assert took(), "bf16 on the CPU with a short sequence should take MatmulAttention"
    assert not took(T=1, S=300, causal=False), "a decode step (one query) should stay on torch's SDPA (faster there)"
    limit = attention.MATMUL_MAX_SCORES
    assert took(T=2, S=limit // 2, causal=False) and not took(T=2, S=limit // 2 + 1, causal=False), \
        "T x S limit not applied"
    assert not took(dtype=torch.float32), "fp32 should stay on torch's kernels (no speed-up measured)"
    assert took(dropout=0.1), "attention dropout should take MatmulAttention too (torch has no CPU flash kernel for it)"
    learned = torch.zeros(1, H, 16, 16, requires_grad=True)  # e.g. T5's relative bias: needs its gradient
    assert not took(bias=learned), "a bias that needs a gradient must go to torch's kernels"
    assert took(bias=learned.detach()), "a constant bias (padding, ALiBi) should take MatmulAttention"
    q, k, v = (t.detach() for t in _qkv(1, 2, 16, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="requires a gradient"):  # called directly: refused, not silently wrong
        matmul_attention(q, k, v, AttentionMask(bias=learned), D**-0.5)


def test_bf16_training_step_matches_the_eager_backend():
    """debug-llama under bf16 autocast: the sdpa backend (now MatmulAttention) and the eager backend on the
    same weights give the same loss and gradients up to bf16 rounding."""
    losses, grads = {}, {}
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    for backend in ("eager", "sdpa"):
        cfg = lmforge.ModelConfig.from_preset("debug-llama", vocab_size=256, attention={"backend": backend})
        model = lmforge.build_model(cfg, seed=0).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses[backend] = loss.item()
        grads[backend] = {name: p.grad for name, p in model.named_parameters()}
    assert abs(losses["eager"] - losses["sdpa"]) < 1e-2, f"losses differ: {losses}"
    for name, ref in grads["eager"].items():
        got = grads["sdpa"][name]
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < 3e-2, f"{name}: gradient differs from the eager backend's by {rel:.2e} (relative norm)"


def test_causal_mask_of_build_attention_mask_reaches_matmul_path():
    """is_causal masks (no bias tensor) are built inside matmul_attention: the future must not leak."""
    T = 12
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(T), causal=True, dtype=torch.bfloat16)
    assert mask.is_causal
    q, k, v = (t.detach() for t in _qkv(1, 4, T, T, dtype=torch.bfloat16))
    out = sdpa_attention(q, k, v, mask, D**-0.5)
    v2 = v.clone()
    v2[:, :, 6:] += 3.0
    out2 = sdpa_attention(q, k, v2, mask, D**-0.5)
    assert torch.equal(out[:, :, :6], out2[:, :, :6]), "queries 0-5 changed when only keys 6+ changed"
    assert not torch.equal(out[:, :, 6:], out2[:, :, 6:]), "queries 6+ ignored their own keys"
