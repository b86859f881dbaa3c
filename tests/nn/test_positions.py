"""Position encodings against their papers' formulas and Hugging Face transformers' implementations."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import AttentionConfig, ModelConfig, PositionConfig
from lmforge.nn.attention import build_attention_mask
from lmforge.nn.positions import (
    AlibiPositions,
    LearnedPositions,
    RotaryPositions,
    alibi_slopes,
    apply_rope,
    apply_rope_reference,
    make_positions,
    relative_position_bucket,
    rope_inv_freq,
    sinusoidal_table,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

# -- RoPE -----------------------------------------------------------------------------------------------------

# name -> (head_dim, our PositionConfig kwargs, HF rope_parameters)
ROPE_CASES = {
    "none-theta1e4-d16": (16, dict(rope_theta=1e4), dict(rope_type="default", rope_theta=1e4)),
    "none-theta5e5-d64": (64, dict(rope_theta=5e5), dict(rope_type="default", rope_theta=5e5)),
    "linear-x4-d32": (32, dict(rope_theta=1e4, rope_scaling="linear", rope_factor=4.0),
                      dict(rope_type="linear", rope_theta=1e4, factor=4.0)),
    "linear-x2.5-d128": (128, dict(rope_theta=1e6, rope_scaling="linear", rope_factor=2.5),
                         dict(rope_type="linear", rope_theta=1e6, factor=2.5)),
    # Llama 3.1's real setting: 8192 original positions, factor 8, head_dim 128
    "llama3-3.1-8b": (128, dict(rope_theta=5e5, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                                rope_high_freq_factor=4.0, rope_original_max_seq_len=8192),
                      dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # a short original context so all three bands (kept, blended, divided) hold several frequencies
    "llama3-short-context": (64, dict(rope_theta=5e5, rope_scaling="llama3", rope_factor=32.0,
                                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                      rope_original_max_seq_len=64),
                             dict(rope_type="llama3", rope_theta=5e5, factor=32.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    "llama3-odd-factors": (32, dict(rope_theta=1e4, rope_scaling="llama3", rope_factor=3.0,
                                    rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
                                    rope_original_max_seq_len=128),
                           dict(rope_type="llama3", rope_theta=1e4, factor=3.0, low_freq_factor=2.0,
                                high_freq_factor=8.0, original_max_position_embeddings=128)),
}


def _hf_config(head_dim: int, rope_parameters: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=131072, rope_parameters=dict(rope_parameters))


def _hf_inv_freq(head_dim: int, rope_parameters: dict) -> torch.Tensor:
    config = _hf_config(head_dim, rope_parameters)
    kind = rope_parameters["rope_type"]
    if kind == "default":  # transformers 5 keeps the unscaled rule on the rotary class, not in the registry
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    return ROPE_INIT_FUNCTIONS[kind](config)[0]


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_inv_freq_matches_transformers(case):
    head_dim, ours_kw, hf_params = ROPE_CASES[case]
    ours = rope_inv_freq(head_dim, PositionConfig(**ours_kw))
    theirs = _hf_inv_freq(head_dim, hf_params)
    assert ours.shape == theirs.shape == (head_dim // 2,)
    rel = ((ours - theirs).abs() / theirs).max().item()
    assert rel <= 1e-7, f"{case}: inverse frequencies differ from transformers by {rel:.2e} (relative)"


def test_llama3_cases_cover_all_three_bands():
    """Otherwise the llama3 comparison could pass with a wrong blend."""
    head_dim, ours_kw, _ = ROPE_CASES["llama3-short-context"]
    plain = rope_inv_freq(head_dim, PositionConfig(rope_theta=ours_kw["rope_theta"]))
    scaled = rope_inv_freq(head_dim, PositionConfig(**ours_kw))
    ratio = plain / scaled
    kept = (ratio - 1).abs() < 1e-6
    divided = (ratio - ours_kw["rope_factor"]).abs() < 1e-4
    blended = ~kept & ~divided
    assert kept.sum() >= 2 and divided.sum() >= 2 and blended.sum() >= 2, \
        f"bands kept/blended/divided: {kept.sum()}/{blended.sum()}/{divided.sum()}"
    assert ((ratio[blended] > 1) & (ratio[blended] < ours_kw["rope_factor"])).all(), "blend must lie between"


@pytest.mark.parametrize("case", ["none-theta5e5-d64", "linear-x4-d32", "llama3-short-context"])
def test_rotary_cos_sin_match_transformers(case):
    head_dim, ours_kw, hf_params = ROPE_CASES[case]
    cfg = ModelConfig(d_model=4 * head_dim, attention=AttentionConfig(n_head=4, head_dim=head_dim),
                      position=PositionConfig(kind="rope", max_seq_len=4096, **ours_kw))
    positions = torch.tensor([[0, 1, 2, 7, 100, 1000, 4000], [3, 3, 4, 5, 6, 7, 8]])
    cos, sin = RotaryPositions(cfg, bidirectional=False).rotary(positions)
    hf = LlamaRotaryEmbedding(_hf_config(head_dim, hf_params))
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    assert cos.shape == (2, 1, 7, head_dim), f"cos shape {tuple(cos.shape)}"
    diff = max((cos[:, 0] - hf_cos).abs().max().item(), (sin[:, 0] - hf_sin).abs().max().item())
    assert diff < 1e-6, f"{case}: RoPE cos/sin differ from transformers by {diff:.2e}"


def _rope(positions: torch.Tensor, head_dim: int = 16, theta: float = 1e4):
    cfg = ModelConfig(d_model=4 * head_dim, attention=AttentionConfig(n_head=4, head_dim=head_dim),
                      position=PositionConfig(kind="rope", rope_theta=theta))
    return RotaryPositions(cfg, bidirectional=False).rotary(positions)


def test_apply_rope_preserves_the_norm_of_each_rotated_pair():
    Dh = 16
    x = torch.randn(2, 3, 5, Dh)
    cos, sin = _rope(torch.arange(5)[None].expand(2, 5) * 37, Dh)
    y = apply_rope(x, cos, sin)
    half = Dh // 2
    pair_norm = lambda t: t[..., :half] ** 2 + t[..., half:] ** 2  # noqa: E731  pairs (i, i + D/2)
    diff = (pair_norm(x) - pair_norm(y)).abs().max().item()
    assert diff < 1e-5, f"RoPE changed the norm of a rotated pair by {diff:.2e}; it must be a pure rotation"
    assert not torch.allclose(x[:, :, 1:], y[:, :, 1:], atol=1e-3), "test is vacuous: nothing rotated"
    assert torch.allclose(x[:, :, 0], y[:, :, 0]), "position 0 must not rotate"


def test_apply_rope_dot_product_depends_only_on_position_difference():
    Dh = 32
    q, k = torch.randn(Dh, dtype=torch.float64), torch.randn(Dh, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        cos, sin = (t.double() for t in _rope(torch.tensor([[m, n]]), Dh))
        qm = apply_rope(q.view(1, 1, 1, Dh).expand(1, 1, 2, Dh), cos, sin)[0, 0, 0]
        kn = apply_rope(k.view(1, 1, 1, Dh).expand(1, 1, 2, Dh), cos, sin)[0, 0, 1]
        return float(qm @ kn)

    for m, n in [(5, 2), (2, 5), (9, 9), (40, 1)]:
        base = score(m, n)
        for shift in (1, 13, 500):
            shifted = score(m + shift, n + shift)
            assert abs(base - shifted) < 1e-4, \
                f"q.k at positions ({m}, {n}) = {base:.6f} but at ({m + shift}, {n + shift}) = {shifted:.6f}"
    assert abs(score(5, 2) - score(5, 3)) > 1e-3, "test is vacuous: the score ignores the offset"


def test_apply_rope_matches_transformers():
    B, Hq, K, T, Dh = 2, 4, 2, 6, 16
    q, k = torch.randn(B, Hq, T, Dh), torch.randn(B, K, T, Dh)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    cos, sin = _rope(positions, Dh)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0], unsqueeze_dim=1)
    diff = max((apply_rope(q, cos, sin) - hf_q).abs().max().item(), (apply_rope(k, cos, sin) - hf_k).abs().max().item())
    assert diff < 1e-6, f"apply_rope differs from transformers' apply_rotary_pos_emb by {diff:.2e}"



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_rope_equals_the_reference_bit_for_bit_forward_and_backward(dtype):
    """The roll form is a refactor of rotate_half: the same numbers exactly, including the gradient, on the
    strided q|k slice of a fused projection as attention passes it (golden loss curves rely on this)."""
    B, H, T, Dh = 2, 5, 7, 16
    cos, sin = (t.to(dtype) for t in _rope(torch.tensor([[0, 1, 2, 3, 40, 41, 900], [5, 5, 6, 7, 8, 9, 10]]), Dh))
    results = []
    for fn in (apply_rope_reference, apply_rope):
        w = (torch.randn(B, T, 3 * H * Dh, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
        w.requires_grad_(True)
        x = w.view(B, T, 3 * H, Dh).transpose(1, 2)[:, : 2 * H]  # (B, 2H, T, D), not contiguous
        y = fn(x, cos, sin)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        results.append((y.detach(), w.grad))
    (ref_y, ref_grad), (y, grad) = results
    assert torch.equal(y, ref_y), f"forward differs by {(y - ref_y).abs().max().item():.2e}"
    assert torch.equal(grad, ref_grad), f"gradient differs by {(grad - ref_grad).abs().max().item():.2e}"
    assert not torch.equal(y, x.detach()), "test is vacuous: nothing rotated"


# -- sinusoidal ------------------------------------------------------------------------------------------------


def _vaswani(n_pos: int, dim: int) -> torch.Tensor:
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)), in float64."""
    pe = torch.zeros(n_pos, dim, dtype=torch.float64)
    for p in range(n_pos):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            pe[p, 2 * i] = math.sin(angle)
            pe[p, 2 * i + 1] = math.cos(angle)
    return pe


# fp32 angles: an error of ~1e-7 relative on p * freq, i.e. ~1e-5 absolute at position 128
SIN_TOL = 5e-5


@pytest.mark.parametrize("dim", [8, 64])
def test_sinusoidal_table_matches_vaswani_formula(dim):
    n_pos = 128
    table = sinusoidal_table(torch.arange(n_pos), dim)
    diff = (table.double() - _vaswani(n_pos, dim)).abs().max().item()
    assert table.shape == (n_pos, dim)
    assert diff < SIN_TOL, f"interleaved sinusoidal table (d={dim}) differs from the formula by {diff:.2e}"


def test_sinusoidal_halves_layout_matches_marian():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    n_pos, dim = 128, 32
    marian = MarianSinusoidalPositionalEmbedding(n_pos, dim).create_weight()
    ours = sinusoidal_table(torch.arange(n_pos), dim, layout="halves")
    diff = (ours - marian).abs().max().item()
    assert diff < SIN_TOL, f"'halves' sinusoidal table differs from Marian's by {diff:.2e}"
    ref = _vaswani(n_pos, dim)
    halves = torch.cat([ref[:, 0::2], ref[:, 1::2]], dim=-1)
    assert (ours.double() - halves).abs().max() < SIN_TOL, "'halves' must be all sines, then all cosines"


def test_sinusoidal_table_accepts_batched_positions():
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])
    table = sinusoidal_table(positions, 16)
    assert table.shape == (2, 3, 16)
    assert torch.equal(table[1], sinusoidal_table(torch.tensor([5, 6, 7]), 16))


# -- ALiBi ----------------------------------------------------------------------------------------------------


def test_alibi_slopes_for_eight_heads_are_powers_of_one_half():
    expected = torch.tensor([2.0 ** -(i + 1) for i in range(8)])
    assert torch.equal(alibi_slopes(8), expected), f"slopes {alibi_slopes(8).tolist()}, expected 1/2 ... 1/256"


@pytest.mark.parametrize("n_head", [1, 2, 3, 4, 6, 8, 12, 16])
def test_alibi_slopes_match_bloom(n_head):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # BLOOM's tensor is slope * key index (B*H, 1, S); the slope is its value at key 1.
    bloom = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32).view(n_head, 2)[:, 1]
    ours = alibi_slopes(n_head)
    rel = ((ours - bloom).abs() / bloom).max().item()
    assert rel < 1e-6, f"{n_head} heads: slopes {ours.tolist()} differ from BLOOM's {bloom.tolist()} ({rel:.2e})"


def test_alibi_bias_is_minus_slope_times_distance():
    cfg = ModelConfig(d_model=32, attention=AttentionConfig(n_head=4), position=PositionConfig(kind="alibi"))
    q_idx, k_idx = torch.arange(3, 6), torch.arange(6)
    bias = AlibiPositions(cfg, bidirectional=False).attention_bias(q_idx, k_idx)
    slopes = alibi_slopes(4)
    assert bias.shape == (1, 4, 3, 6)
    for h in range(4):
        for i, qi in enumerate(q_idx.tolist()):
            for j in range(6):
                assert bias[0, h, i, j].item() == pytest.approx(-slopes[h].item() * abs(qi - j)), (h, qi, j)


# -- T5 relative buckets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_buckets,max_distance", [(32, 128), (16, 64), (64, 256)])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_relative_position_bucket_matches_t5(bidirectional, n_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 301)
    ours = relative_position_bucket(relative, bidirectional, n_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=n_buckets,
                                                   max_distance=max_distance)
    bad = (ours != theirs).nonzero().flatten()
    assert bad.numel() == 0, \
        f"buckets differ from T5's at offsets {relative[bad][:10].tolist()}: {ours[bad][:10].tolist()} " \
        f"vs {theirs[bad][:10].tolist()}"
    assert ours.min() >= 0 and ours.max() < n_buckets, "buckets must lie in [0, n_buckets)"


# -- learned positions and the registry ------------------------------------------------------------------------


def test_learned_positions_reject_positions_past_the_table():
    cfg = ModelConfig(d_model=16, attention=AttentionConfig(n_head=2), position=PositionConfig(kind="learned",
                                                                                               max_seq_len=8))
    pos = LearnedPositions(cfg, bidirectional=False)
    x = torch.zeros(1, 3, 16)
    out = pos.add_to_embeddings(x, torch.tensor([[5, 6, 7]]))  # the last valid position is fine
    assert torch.equal(out, pos.table.weight[5:8][None])
    with pytest.raises(ValueError, match=r"position 11 .*8 positions"):
        pos.add_to_embeddings(x, torch.tensor([[9, 10, 11]]))


def test_make_positions_unknown_kind_lists_valid_kinds():
    cfg = ModelConfig()
    cfg.position.kind = "spiral"  # bypasses config validation on purpose
    with pytest.raises(ValueError, match=r"'spiral'.*alibi.*rope"):
        make_positions(cfg, bidirectional=False)


def test_position_hooks_are_neutral_where_unused():
    """Every kind answers all three hooks; the unused ones are no-ops (the stack's forward is one code path)."""
    x, positions = torch.randn(1, 4, 32), torch.arange(4)[None]
    q_idx = k_idx = torch.arange(4)
    for kind in ("none", "learned", "sinusoidal", "rope", "alibi", "relative"):
        cfg = ModelConfig(d_model=32, attention=AttentionConfig(n_head=4), position=PositionConfig(kind=kind))
        pos = make_positions(cfg, bidirectional=False)
        added = pos.add_to_embeddings(x, positions)
        assert (kind in ("learned", "sinusoidal")) != torch.equal(added, x), f"{kind}: add_to_embeddings"
        assert (kind == "rope") == (pos.rotary(positions) is not None), f"{kind}: rotary"
        bias = pos.attention_bias(q_idx, k_idx)
        assert (kind in ("alibi", "relative")) == (bias is not None), f"{kind}: attention_bias"
        if bias is not None:  # the bias feeds build_attention_mask directly
            mask = build_attention_mask(q_idx=q_idx, k_idx=k_idx, causal=True, dtype=torch.float32,
                                        position_bias=bias)
            assert mask.bias.shape == (1, 4, 4, 4)
