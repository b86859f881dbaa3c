"""Position encodings, one class per `PositionConfig.kind`, all with the same three hooks.

A stack calls, in order:
  x = pos.add_to_embeddings(x, positions)    learned / sinusoidal absolute positions
  rope = pos.rotary(positions)               (cos, sin) for RoPE, else None
  bias = pos.attention_bias(q_idx, k_idx)    (1, H, T, S) additive bias for ALiBi / T5, else None
so the stack's forward stays the same for every variant.

Shapes: positions (B, T) int; q_idx (T,), k_idx (S,) absolute indices of queries and keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import ModelConfig, PositionConfig
from lmforge.nn.kernels import cpu_kernels, use_kernel


class NoPositions(nn.Module):
    def add_to_embeddings(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def attention_bias(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor | None:
        return None


class LearnedPositions(NoPositions):
    """A trained table of absolute position vectors (GPT-2, BERT; BART starts at row `offset` = 2)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.max_seq_len = cfg.position.max_seq_len
        self.offset = cfg.position.offset
        self.table = nn.Embedding(cfg.position.max_seq_len + self.offset, cfg.d_model)

    def add_to_embeddings(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # the check reads a value back (a graph break under torch.compile, which is left to the lookup's own
        # index error); eager runs get the explanation
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} exceeds the learned table of {self.max_seq_len} positions; "
                "shorten the input or use a model with a longer position.max_seq_len"
            )
        return x + self.table(positions + self.offset)


def sinusoidal_table(positions: torch.Tensor, dim: int, layout: str = "interleaved") -> torch.Tensor:
    """Vaswani et al. 2017 §3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...).

    layout "halves" puts all sines first, then all cosines (the Marian/fairseq layout).
    """
    # float64 angles: at positions in the thousands fp32 loses ~1e-4 of accuracy in sin/cos
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)  # (..., T, d/2)
    if layout == "halves":
        table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    else:
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return table.float()


class SinusoidalPositions(NoPositions):
    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.dim = cfg.d_model
        self.layout = cfg.position.sinusoidal_layout

    def add_to_embeddings(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + sinusoidal_table(positions, self.dim, self.layout).to(x.dtype)


def rope_inv_freq(head_dim: int, cfg: PositionConfig) -> torch.Tensor:
    """RoPE inverse frequencies theta^(-2i/d) (Su et al. 2021, eq. 15), with optional scaling:
    linear = position interpolation (Chen et al. 2023): every frequency divided by the factor;
    llama3 = Llama 3.1's banded rule: long wavelengths divided by the factor, short ones kept,
    and a smooth interpolation between the two bands."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as written in Su et al. 2021 (§3.4.2, the efficient form) and HF's `apply_rotary_pos_emb`:
    x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) for the halves x1, x2 of the last dimension.
    The oracle of `apply_rope`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, H, T, D) by the position angle ("rotate half",
    the GPT-NeoX/HF layout; GGUF's interleaved layout is permuted to this one on import). Only the last
    dimension is special: x may as well be (B, T, H, D) with the tables as (B|1, T, 1, D).

    The same numbers as `apply_rope_reference`, bit for bit, forward and backward: rotate_half(x) sin
    = roll(x, D/2) (-s1, s2) since (-x2) s == x2 (-s) exactly. The sign goes on sin (B|1, 1, T, D, shared
    by all heads) instead of on x, and a roll's backward is a roll, where the chunks of the reference
    each zero-fill a full-size gradient and add them up.
    """
    half = x.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # (B|1, 1, T, D)
    return x * cos + x.roll(half, dims=-1) * signed_sin


def rope_heads_applies(qk: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether `rope_heads` (the fused kernel) takes this bf16 CPU projection and these fp32 tables."""
    B, T, _, D = qk.shape
    return (qk.device.type == "cpu" and qk.dtype == torch.bfloat16 and qk.stride(-1) == 1 and D % 2 == 0
            and cos.dtype == torch.float32 and cos.shape[0] in (1, B) and cos.shape[1:] == (1, T, D)
            and cos.is_contiguous() and not torch.compiler.is_compiling() and use_kernel("rope"))


def rope_heads(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_head: int):
    """qk (B, T, H + K, D) bf16, the query and key heads of a fused projection, tables (B|1, 1, T, D) fp32 ->
    q (B, H, T, D), k (B, K, T, D), rotated and contiguous: `apply_rope` and the transpose to heads-first in one
    pass (lmforge/nn/kernels/cpu.c), so the attention matmuls read them without copies. Computed in fp32 with
    fp32 tables, rounded once (the unfused bf16 path rounds the tables, both products and their sum)."""
    return FusedRope.apply(qk, cos, sin, n_q_head)


class FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_head: int):
        B, T, heads, D = qk.shape
        cos, sin = cos[:, 0], sin[:, 0]  # (B|1, T, D)
        q = torch.empty(B, n_q_head, T, D, dtype=qk.dtype)
        k = torch.empty(B, heads - n_q_head, T, D, dtype=qk.dtype)
        kernels = cpu_kernels()
        kernels.rope_(qk[:, :, :n_q_head], q.transpose(1, 2), cos, sin, backward=False)
        kernels.rope_(qk[:, :, n_q_head:], k.transpose(1, 2), cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.n_q_head, ctx.qk_shape, ctx.dtype = n_q_head, qk.shape, qk.dtype
        return q, k

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        n_q = ctx.n_q_head
        grad = torch.empty(ctx.qk_shape, dtype=ctx.dtype)
        kernels = cpu_kernels()
        for g, heads in ((grad_q, slice(0, n_q)), (grad_k, slice(n_q, None))):
            if g is None:  # that output took no part in the loss
                grad[:, :, heads] = 0
                continue
            g = g.to(ctx.dtype)
            g = g if g.stride(-1) == 1 else g.contiguous()
            kernels.rope_(g.transpose(1, 2), grad[:, :, heads], cos, sin, backward=True)
        return grad, None, None, None


class RotaryPositions(NoPositions):
    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.head_dim = cfg.attention.head_dim
        self.cfg = cfg.position

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_inv_freq(self.head_dim, self.cfg).to(positions.device)
        angles = positions.float()[..., None] * inv_freq  # (B, T, D/2), fp32 even under autocast
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
        return angles.cos(), angles.sin()


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Head slopes of ALiBi (Press et al. 2022, §3): the geometric sequence 2^(-8i/n); for n not a
    power of two, the closest power's slopes plus every other slope of the next power."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(closest)
    if closest < n_head:
        slopes += power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


class AlibiPositions(NoPositions):
    """No embeddings; each head adds -slope * |i - j| to its attention scores."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.n_head = cfg.attention.n_head

    def attention_bias(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        distance = (q_idx[:, None] - k_idx[None, :]).abs().float()  # (T, S)
        slopes = alibi_slopes(self.n_head).to(q_idx.device)
        return (-slopes[:, None, None] * distance)[None]  # (1, H, T, S)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, n_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of key-minus-query offsets (Raffel et al. 2020, §2.1): exact buckets for small
    offsets, logarithmic ones up to max_distance; separate halves for past and future when
    bidirectional."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets += (relative > 0).long() * n_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = n_buckets // 2
    is_small = relative < max_exact
    log_bucket = max_exact + (
        torch.log(relative.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
        * (n_buckets - max_exact)
    ).long()
    log_bucket = torch.clamp(log_bucket, max=n_buckets - 1)
    return buckets + torch.where(is_small, relative, log_bucket)


class RelativePositions(NoPositions):
    """T5 relative attention bias: a learned scalar per (bucket, head), shared by all layers."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets = cfg.position.relative_buckets
        self.max_distance = cfg.position.relative_max_distance
        self.bias = nn.Embedding(self.n_buckets, cfg.attention.n_head)

    def attention_bias(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        relative = k_idx[None, :] - q_idx[:, None]  # (T, S)
        buckets = relative_position_bucket(relative, self.bidirectional, self.n_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


POSITIONS = {
    "none": NoPositions,
    "learned": LearnedPositions,
    "sinusoidal": SinusoidalPositions,
    "rope": RotaryPositions,
    "alibi": AlibiPositions,
    "relative": RelativePositions,
}


def make_positions(cfg: ModelConfig, *, bidirectional: bool) -> nn.Module:
    kind = cfg.position.kind
    if kind not in POSITIONS:
        raise ValueError(f"position kind {kind!r} is unknown; valid kinds: {sorted(POSITIONS)}")
    cls = POSITIONS[kind]
    return cls() if cls is NoPositions else cls(cfg, bidirectional)
