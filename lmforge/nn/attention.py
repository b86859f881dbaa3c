"""Multi-head attention: MHA / GQA / MQA, self or cross, with a readable eager oracle.

Shapes: B batch, T queries, S keys, H query heads, K key/value heads, D head dim.
Key/value heads are stored once (K of them) and shared by H // K query heads each.

Masks reach attention as an `AttentionMask`: either `is_causal` with no tensor (the fast path
that lets SDPA pick FlashAttention), or an additive float `bias` (B|1, H|1, T, S) that already
holds padding, causality, sliding windows and position biases (ALiBi, T5), built once per
forward by `build_attention_mask` and shared by every layer.

Backends (`AttentionConfig.backend`): "eager", the readable reference, and "sdpa", torch's fused
scaled_dot_product_attention, which on the CPU in bf16 for short sequences hands over to
`MatmulAttention` (batched matmuls around materialised scores), faster there than torch's CPU kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import AttentionConfig
from lmforge.nn.kernels import MAX_SOFTMAX_COLS, cpu_kernels, use_kernel
from lmforge.nn.positions import apply_rope, rope_heads, rope_heads_applies


@dataclass
class AttentionMask:
    bias: torch.Tensor | None = None  # (B|1, H|1, T, S) additive; masked entries hold dtype's min
    is_causal: bool = False  # only with bias None and T == S


def build_attention_mask(
    *,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    causal: bool,
    dtype: torch.dtype,
    window: int | None = None,
    key_padding: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
) -> AttentionMask:
    """Combine every masking rule into one additive bias.

    q_idx (T,), k_idx (S,): absolute indices of queries and keys (queries of a cached decode step
    start after the cached keys). key_padding (B, S): True/1 for real tokens. documents (B, S): the
    document each key belongs to, for packed sequences; the last T columns are the queries'. A query
    may see key j if j is not padding, j is in its document, j <= i when causal, and i - j < window.
    """
    T, S = q_idx.numel(), k_idx.numel()
    if key_padding is None and window is None and position_bias is None and documents is None:
        if not causal:
            return AttentionMask()
        if T == S:
            return AttentionMask(is_causal=True)
        if T == 1:  # one new query after the cache: every cached key is in its past
            return AttentionMask()
    allowed = torch.ones(T, S, dtype=torch.bool, device=q_idx.device)
    offset = q_idx[:, None] - k_idx[None, :]  # (T, S)
    if causal:
        allowed &= offset >= 0
    if window is not None:
        allowed &= offset < window
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_padding is not None:
        allowed = allowed & key_padding.bool()[:, None, None, :]  # (B, 1, T, S)
    if documents is not None:
        same = documents[:, -T:, None] == documents[:, None, :]  # (B, T, S)
        allowed = allowed & same[:, None]
    bias = torch.zeros((), dtype=dtype, device=q_idx.device) if position_bias is None else position_bias.to(dtype)
    # A finite minimum (not -inf) keeps fully masked rows (left-padding queries) free of NaN.
    return AttentionMask(bias=torch.where(allowed, bias, torch.finfo(dtype).min))


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 for half precision; float64 stays float64


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V, written out: the reference every fast path is tested against."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(groups, dim=1)
    # Scores in fp32 (as the softmax): in fp16, a negative score plus the mask's minimum (-65504)
    # overflows to -inf, and a fully masked row (a left-padding query) would turn into NaN.
    scores = (q @ k.transpose(-2, -1)).to(_softmax_dtype(q.dtype)) * scale  # (B, H, T, S)
    if mask.is_causal:
        T, S = scores.shape[-2:]
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    if mask.bias is not None:
        scores = scores + mask.bias
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return probs @ v  # (B, H, T, D)


class MatmulAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + bias) V as four batched matmuls around a materialised (B, H, T, S) score
    tensor, with its own backward: exact attention, the fast path for short sequences in bf16 on the CPU.

    Forward is `eager_attention`'s arithmetic (scores from a matmul in the inputs' dtype, softmax in fp32,
    probabilities cast back, then dropout: kept ones scaled by 1 / (1 - p)); it keeps only the probabilities
    P (inputs' dtype) and the dropout mask for backward. Backward is the softmax Jacobian (as in
    FlashAttention's backward, Dao et al. 2022, Alg. 4, without tiling), with Z = dropout(P):
    dV = Z^T dO, dZ = dO V^T, dP = dropout's mask applied to dZ, dS = P * (dP - rowsum(dP * P))
    (`_softmax_backward_data`, one pass), dQ = scale dS K, dK = scale dS^T Q.
    With bf16 inputs on the CPU and no bias tensor, scaling, the causal mask and the softmax run as one fused
    pass over the bf16 scores (`lmforge.nn.kernels`, computed in fp32 as above, summed in another order).
    q (B, H, T, D), k and v (B, H, S, D) (GQA heads already repeated), bias (B|1, H|1, T, S) or None,
    taking no gradient; keep (B, H, T, S) bool or None: which probabilities dropout keeps; causal: query i
    (the last T of S positions) sees keys j <= i + S - T."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, keep, dropout: float, causal: bool = False):
        # heads-first copies once (no-ops for contiguous inputs): the batched matmuls would copy a transposed
        # projection's heads themselves, in forward and again in backward
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scores = torch.matmul(q, k.transpose(-2, -1))  # (B, H, T, S)
        if _softmax_kernel_applies(scores, bias, causal):
            # one pass: scale, causal mask, softmax in fp32, bf16 out (lmforge/nn/kernels/cpu.c), in place
            probs = cpu_kernels().attn_softmax_(scores, scale, causal)
        else:
            scores = scores.to(_softmax_dtype(q.dtype)).mul_(scale)
            if causal:
                bias = _causal_bias(*scores.shape[-2:], scores.dtype, q.device)
            if bias is not None:
                scores.add_(bias)
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.dropout = scale, dropout
        return torch.matmul(_drop(probs, keep, ctx.dropout), v)  # (B, H, T, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, probs, keep = ctx.saved_tensors
        grad_v = torch.matmul(_drop(probs, keep, ctx.dropout).transpose(-2, -1), grad)  # (B, H, S, D)
        grad_probs = _drop(torch.matmul(grad, v.transpose(-2, -1)), keep, ctx.dropout)  # (B, H, T, S)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def _softmax_kernel_applies(scores: torch.Tensor, bias: torch.Tensor | None, causal: bool) -> bool:
    T, S = scores.shape[-2:]
    return (bias is None and scores.device.type == "cpu" and scores.dtype == torch.bfloat16
            and S <= MAX_SOFTMAX_COLS and (T <= S or not causal) and scores.is_contiguous()
            and not torch.compiler.is_compiling() and use_kernel("attn_softmax"))


def _causal_bias(T: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, S) additive mask: query i (the last T of S positions) sees keys j <= i + S - T."""
    return torch.full((T, S), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(S - T + 1)


def _drop(x: torch.Tensor, keep: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """Inverted dropout with a given mask: x * keep / (1 - p), as F.dropout computes it."""
    return x if keep is None else x * keep * (1.0 / (1.0 - dropout))


def dropout_keep(shape: torch.Size, dropout: float, device: torch.device) -> torch.Tensor:
    """The mask of kept probabilities (bool, True with probability 1 - dropout), from torch's global RNG."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - dropout)


# Largest T x S score matrix (per batch row and head) for which `sdpa_attention` takes MatmulAttention.
# bench/attention.py (bf16, 2 threads, forward + backward at 2048 tokens per call, the fused softmax kernel
# built) measured it 6.0x faster than torch's CPU flash kernel at T = 64, 3.5x at 256 and 512, 1.9x and
# 1.6x at 1024 and 2048; beyond 512 the saved probabilities (2 bytes per score) outgrow the activations,
# so flash attention's memory wins there. With attention dropout torch runs its unfused math path
# instead: 1.3x at T = 256 (`--dropout 0.1`; drawing the mask takes most of lmforge's time).
MATMUL_MAX_SCORES = 512 * 512


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float, dropout: float = 0.0
) -> torch.Tensor:
    """Attention through `MatmulAttention`; the mask's bias must take no gradient."""
    if mask.bias is not None and mask.bias.requires_grad:
        raise ValueError("matmul_attention: the attention bias requires a gradient (a learned position bias, e.g. "
                         "T5's), which MatmulAttention does not compute; use sdpa_attention or eager_attention")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    keep = dropout_keep((*q.shape[:-1], k.shape[-2]), dropout, q.device) if dropout > 0 else None  # (B, H, T, S)
    return MatmulAttention.apply(q, k, v, mask.bias, scale, keep, dropout, mask.is_causal)


def _matmul_is_faster(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> bool:
    # Not for one query (a decode step): there the call's fixed costs (and GQA's repeated cache) outweigh the
    # kernel's, and torch's SDPA reads the cache in place: bench/generate.py, bf16 batch 1, 1.47x HF with
    # SDPA for decode steps against 1.21x with MatmulAttention.
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] > 1
            and q.shape[-2] * k.shape[-2] <= MATMUL_MAX_SCORES and (mask.bias is None or not mask.bias.requires_grad))


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float, dropout: float = 0.0
) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (FlashAttention / memory-efficient kernels on GPU), or,
    on the CPU in bf16 for short sequences (T x S <= MATMUL_MAX_SCORES) of more than one query,
    `matmul_attention`, which is faster there than torch's CPU kernels."""
    if _matmul_is_faster(q, k, mask):
        return matmul_attention(q, k, v, mask, scale, dropout)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.bias, dropout_p=dropout, is_causal=mask.is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention}


class Attention(nn.Module):
    """Self-attention (keys from x) or cross-attention (keys from `memory`), chosen at construction."""

    def __init__(self, d_model: int, cfg: AttentionConfig, *, cross: bool = False, layer_idx: int = 0) -> None:
        super().__init__()
        if cfg.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {cfg.backend!r} is unknown; valid: {sorted(ATTENTION_BACKENDS)}")
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else self.head_dim**-0.5
        self.dropout = cfg.dropout
        self.cross = cross
        self.layer_idx = layer_idx
        self.attend = ATTENTION_BACKENDS[cfg.backend]
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        if cross:
            self.q = nn.Linear(d_model, q_dim, bias=cfg.qkv_bias)
            self.kv = nn.Linear(d_model, 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            self.qkv = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(q_dim, d_model, bias=cfg.out_bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). Self-attention writes its keys/values to `cache` (if any);
        cross-attention projects `memory` (B, S, d_model) once per cache and reuses `cache.cross`."""
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if self.cross:
            q = self.q(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k, v = self._cross_kv(memory, cache)  # (B, K, S, D)
        else:
            # Split the fused projection with `split` in its own (B, T, heads, D) layout and transpose last:
            # split's backward is one cat of the pieces' gradients into a contiguous buffer that the view
            # back to (B, T, d) reads in place, where `narrow` zero-fills a full-size gradient per piece (and
            # the transposed sum needs a copy). RoPE rotates q and k in one call.
            qk, v = self.qkv(x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)  # (B, T, H+K | K, D)
            if rope is not None and rope_heads_applies(qk, rope[0]):  # CPU bf16: the fused kernel
                q, k = rope_heads(qk, *rope, H)  # (B, H|K, T, D), contiguous
            else:
                if rope is not None:
                    cos, sin = rope  # (B|1, 1, T, D)
                    if cos.dtype != qk.dtype:  # fp32 tables, bf16 activations under autocast
                        cos, sin = cos.to(qk.dtype), sin.to(qk.dtype)
                    qk = apply_rope(qk, cos.transpose(1, 2), sin.transpose(1, 2))  # tables as (B|1, T, 1, D)
                q, k = (t.transpose(1, 2) for t in qk.split([H, K], dim=2))  # (B, H|K, T, D)
            v = v.transpose(1, 2)  # (B, K, T, D)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D): cached keys and these
        y = self.attend(q, k, v, mask, self.scale, self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))

    def _cross_kv(self, memory: torch.Tensor | None, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values (B, K, S, D): from `cache.cross` when this generation has projected
        them already, else projected now (and stored in the cache, if any)."""
        if cache is not None and cache.cross[self.layer_idx] is not None:
            return cache.cross[self.layer_idx]
        if memory is None:
            raise ValueError("cross-attention needs memory (the encoder output, B x S x d_model): pass "
                             "model.encode(input_ids) or the source input_ids")
        B, S, _ = memory.shape
        kv = self.kv(memory).view(B, S, 2 * self.n_kv_head, self.head_dim)  # (B, S, 2K, D)
        # split (backward: one cat), not slicing (backward: a zero-filled full-size gradient per slice)
        k, v = (t.transpose(1, 2) for t in kv.split(self.n_kv_head, dim=2))  # (B, K, S, D)
        if cache is not None:
            cache.cross[self.layer_idx] = (k, v)
        return k, v
