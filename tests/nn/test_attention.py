"""Attention: the fused SDPA backend against the eager reference for every mask `build_attention_mask`
makes, the eager reference against a from-scratch loop, mask semantics, and GQA head sharing.

Shapes: B batch, H query heads, K key/value heads, T queries, S keys, D head dim.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import AttentionConfig, ModelConfig, PositionConfig
from lmforge.nn.attention import (
    ATTENTION_BACKENDS,
    Attention,
    AttentionMask,
    build_attention_mask,
    eager_attention,
    sdpa_attention,
)
from lmforge.nn.positions import AlibiPositions, RelativePositions, RotaryPositions, apply_rope_reference

TOL = 1e-5  # fp32, eager vs SDPA
H, D = 8, 16
KV_HEADS = [8, 4, 2, 1]  # MHA, GQA H/2, GQA H/4, MQA


def _qkv(B: int, K: int, T: int, S: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, K, S, D, generator=g)
    v = torch.randn(B, K, S, D, generator=g)
    return q, k, v


def _pos_cfg(kind: str) -> ModelConfig:
    return ModelConfig(d_model=H * D, attention=AttentionConfig(n_head=H), position=PositionConfig(kind=kind))


def _alibi(q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    return AlibiPositions(_pos_cfg("alibi"), bidirectional=False).attention_bias(q_idx, k_idx)


def _t5(bidirectional: bool):
    rel = RelativePositions(_pos_cfg("relative"), bidirectional=bidirectional)
    with torch.no_grad():
        rel.bias.weight.copy_(torch.randn(rel.bias.weight.shape, generator=torch.Generator().manual_seed(0)))
    return lambda q_idx, k_idx: rel.attention_bias(q_idx, k_idx).detach()


def _padding(B: int, S: int, side: str) -> torch.Tensor:
    """Row 0 unpadded; row 1 has 3 pad keys (left or right); row 2 (if any) has 1 pad key."""
    pad = torch.ones(B, S, dtype=torch.long)
    n = [0, 3, 1][:B]
    for b, count in enumerate(n):
        if count:
            if side == "left":
                pad[b, :count] = 0
            else:
                pad[b, S - count:] = 0
    return pad


# name -> dict(B, T, past, causal, window, padding side, position-bias fn)
MASK_CASES = {
    "causal": dict(T=7, past=0, causal=True),
    "bidirectional": dict(T=7, past=0, causal=False),
    "causal-left-pad": dict(T=7, past=0, causal=True, pad="left"),
    "causal-right-pad": dict(T=7, past=0, causal=True, pad="right"),
    "bidirectional-pad": dict(T=7, past=0, causal=False, pad="right"),
    "window-1": dict(T=7, past=0, causal=True, window=1),
    "window-2": dict(T=7, past=0, causal=True, window=2),
    "window-3-left-pad": dict(T=7, past=0, causal=True, window=3, pad="left"),
    "window-larger-than-T": dict(T=7, past=0, causal=True, window=11),
    "alibi": dict(T=7, past=0, causal=True, bias=_alibi),
    "alibi-left-pad": dict(T=7, past=0, causal=True, bias=_alibi, pad="left"),
    "t5-bidirectional": dict(T=7, past=0, causal=False, bias=_t5(True)),
    "t5-causal": dict(T=7, past=0, causal=True, bias=_t5(False)),
    "decode-step": dict(T=1, past=8, causal=True),
    "decode-step-window-pad": dict(T=1, past=8, causal=True, window=4, pad="left"),
    "decode-step-alibi": dict(T=1, past=8, causal=True, bias=_alibi),
    "chunked-prefill": dict(T=3, past=6, causal=True),
    "chunked-prefill-window-pad": dict(T=3, past=6, causal=True, window=4, pad="left"),
}


def _mask_for(case: dict, B: int) -> tuple[AttentionMask, int, int, torch.Tensor | None]:
    T, past = case["T"], case["past"]
    S = past + T
    q_idx, k_idx = torch.arange(past, S), torch.arange(S)
    pad = _padding(B, S, case["pad"]) if "pad" in case else None
    bias = case["bias"](q_idx, k_idx) if "bias" in case else None
    mask = build_attention_mask(q_idx=q_idx, k_idx=k_idx, causal=case["causal"], dtype=torch.float32,
                                window=case.get("window"), key_padding=pad, position_bias=bias)
    return mask, T, S, pad


def test_backend_registry_holds_both_backends():
    assert set(ATTENTION_BACKENDS) == {"eager", "sdpa"}, f"unexpected backends {sorted(ATTENTION_BACKENDS)}"


@pytest.mark.parametrize("n_kv_head", KV_HEADS, ids=lambda k: f"kv{k}")
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_sdpa_matches_eager(case, n_kv_head):
    B = 3
    mask, T, S, _ = _mask_for(MASK_CASES[case], B)
    q, k, v = _qkv(B, n_kv_head, T, S)
    ref = eager_attention(q, k, v, mask, D**-0.5)
    out = sdpa_attention(q, k, v, mask, D**-0.5)
    assert ref.shape == out.shape == (B, H, T, D)
    assert not ref.isnan().any() and not out.isnan().any(), f"{case}: NaN (eager {ref.isnan().sum()}, " \
        f"sdpa {out.isnan().sum()}); fully masked rows must stay finite"
    diff = (ref - out).abs().max().item()
    assert diff < TOL, f"{case}, {H} heads / {n_kv_head} kv heads: SDPA differs from eager by {diff:.2e} > {TOL}"


def test_left_padding_makes_a_fully_masked_query_row_without_nan():
    """Causal + 3 left pad keys: query 0 of row 1 sees only key 0, which is padding -> nothing visible."""
    mask, T, S, pad = _mask_for(MASK_CASES["causal-left-pad"], 3)
    visible = mask.bias > torch.finfo(torch.float32).min / 2  # (B, 1, T, S)
    assert not visible[1, 0, 0].any(), "test setup: query 0 of the left-padded row should see no key"
    q, k, v = _qkv(3, 2, T, S)
    for name, fn in ATTENTION_BACKENDS.items():
        out = fn(q, k, v, mask, D**-0.5)
        assert torch.isfinite(out).all(), f"{name}: fully masked query rows produced NaN/inf"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fully_masked_row_stays_finite_in_half_precision(dtype):
    """Regression: eager used to add the mask's minimum to fp16 scores; a negative score then overflowed
    to -inf and a fully masked row (left-padding query) became NaN, which later layers spread to every
    query through 0 * NaN in probs @ v."""
    q = torch.full((1, 1, 4, 8), 4.0, dtype=dtype)
    k = torch.full((1, 1, 4, 8), -4.0, dtype=dtype)  # every score strongly negative
    v = torch.randn(1, 1, 4, 8).to(dtype)
    mask = build_attention_mask(q_idx=torch.arange(4), k_idx=torch.arange(4), causal=True, dtype=dtype,
                                key_padding=torch.tensor([[0, 0, 1, 1]]))
    for name, fn in ATTENTION_BACKENDS.items():
        out = fn(q, k, v, mask, 8**-0.5)
        assert torch.isfinite(out).all(), f"{name} ({dtype}): fully masked rows gave {out[0, 0, :, 0].tolist()}"


@pytest.mark.parametrize("n_kv_head", KV_HEADS, ids=lambda k: f"kv{k}")
def test_cross_attention_sdpa_matches_eager(n_kv_head):
    """T=5 decoder queries over S=9 memory keys with memory padding; no causality."""
    B, T, S = 3, 5, 9
    pad = _padding(B, S, "right")
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(S), causal=False, dtype=torch.float32,
                                key_padding=pad)
    q, k, v = _qkv(B, n_kv_head, T, S, seed=3)
    diff = (eager_attention(q, k, v, mask, D**-0.5) - sdpa_attention(q, k, v, mask, D**-0.5)).abs().max().item()
    assert diff < TOL, f"cross attention, kv={n_kv_head}: SDPA differs from eager by {diff:.2e}"
    # Padding must matter: changing padded memory values leaves the output unchanged, real ones do not.
    v2 = v.clone()
    v2[1, :, S - 3:] += 5.0
    same = eager_attention(q, k, v2, mask, D**-0.5)
    assert torch.allclose(same, eager_attention(q, k, v, mask, D**-0.5), atol=1e-6), "padded memory leaked in"


# -- the eager reference against a from-scratch loop ----------------------------------------------------------


def _loop_attention(q, k, v, scale, allowed, bias):
    """softmax over the allowed keys only (masked keys excluded, not just down-weighted), one query at a time,
    in float64. allowed(b, i, j) -> bool; bias(h, i, j) -> float."""
    B, Hq, T, Dh = q.shape
    groups = Hq // k.shape[1]
    out = torch.zeros(B, Hq, T, Dh, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                keys = [j for j in range(k.shape[2]) if allowed(b, i, j)]
                if not keys:
                    continue
                scores = torch.tensor([
                    float((q[b, h, i].double() * k[b, h // groups, j].double()).sum()) * scale + bias(h, i, j)
                    for j in keys
                ], dtype=torch.float64)
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                for wj, j in zip(w, keys):
                    out[b, h, i] += wj * v[b, h // groups, j].double()
    return out


def test_eager_matches_loop_formula():
    """Padding + causal + window + ALiBi + GQA 4/2 at once, with a chunk of queries after cached keys."""
    B, Hq, K, Dh, past, T, window = 2, 4, 2, 8, 3, 4, 3
    S = past + T
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(B, Hq, T, Dh, generator=g), torch.randn(B, K, S, Dh, generator=g), \
        torch.randn(B, K, S, Dh, generator=g)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, :2] = 0
    q_idx, k_idx = torch.arange(past, S), torch.arange(S)
    cfg = ModelConfig(d_model=Hq * Dh, attention=AttentionConfig(n_head=Hq), position=PositionConfig(kind="alibi"))
    alibi = AlibiPositions(cfg, bidirectional=False).attention_bias(q_idx, k_idx)
    mask = build_attention_mask(q_idx=q_idx, k_idx=k_idx, causal=True, dtype=torch.float32, window=window,
                                key_padding=pad, position_bias=alibi)
    scale = Dh**-0.5
    slopes = [2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)]

    def allowed(b, i, j):
        qi = past + i
        return bool(pad[b, j]) and j <= qi and qi - j < window

    def bias(h, i, j):
        return -slopes[h] * abs(past + i - j)

    expected = _loop_attention(q, k, v, scale, allowed, bias)
    got = eager_attention(q, k, v, mask, scale).double()
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, f"eager attention differs from the loop formula by {diff:.2e}"


def test_eager_is_causal_path_matches_loop_formula():
    B, Hq, Dh, T = 1, 2, 4, 5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, Hq, T, Dh, generator=g) for _ in range(3))
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(T), causal=True, dtype=torch.float32)
    assert mask.is_causal
    expected = _loop_attention(q, k, v, 0.5, lambda b, i, j: j <= i, lambda h, i, j: 0.0)
    diff = (eager_attention(q, k, v, mask, 0.5).double() - expected).abs().max().item()
    assert diff < 1e-5, f"eager is_causal path differs from the loop formula by {diff:.2e}"


# -- mask semantics through the Attention module ----------------------------------------------------------------


def _module(backend: str, n_kv_head: int = 2, d_model: int = 32, n_head: int = 4, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(d_model, AttentionConfig(n_head=n_head, n_kv_head=n_kv_head, head_dim=d_model // n_head,
                                              backend=backend)).eval()


@pytest.mark.parametrize("backend", list(ATTENTION_BACKENDS))
def test_causal_output_ignores_future_tokens(backend):
    attn = _module(backend)
    T, i = 8, 3
    x = torch.randn(2, T, 32)
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(T), causal=True, dtype=x.dtype)
    x2 = x.clone()
    x2[:, i + 1:] = torch.randn(2, T - i - 1, 32)
    with torch.no_grad():
        y, y2 = attn(x, mask), attn(x2, mask)
    assert torch.allclose(y[:, : i + 1], y2[:, : i + 1], atol=1e-6), \
        f"{backend}: positions <= {i} changed when only tokens > {i} changed (causal mask leaks the future)"
    assert not torch.allclose(y[:, i + 1:], y2[:, i + 1:], atol=1e-3), "test is vacuous: future outputs unchanged"


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("backend", list(ATTENTION_BACKENDS))
def test_sliding_window_output_ignores_tokens_outside_the_window(backend, window):
    attn = _module(backend)
    T, i = 10, 7
    x = torch.randn(2, T, 32)
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(T), causal=True, dtype=x.dtype,
                                window=window)
    x_old = x.clone()
    x_old[:, : i - window + 1] += torch.randn(2, i - window + 1, 32)  # tokens <= i - window
    x_in = x.clone()
    x_in[:, i - window + 1] += 1.0  # the oldest token inside the window
    with torch.no_grad():
        y, y_old, y_in = attn(x, mask)[:, i], attn(x_old, mask)[:, i], attn(x_in, mask)[:, i]
    assert torch.allclose(y, y_old, atol=1e-6), \
        f"{backend}: with window {window}, output {i} changed when tokens <= {i - window} changed"
    assert not torch.allclose(y, y_in, atol=1e-4), \
        f"{backend}: with window {window}, output {i} ignored token {i - window + 1}, which is inside the window"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("backend", list(ATTENTION_BACKENDS))
def test_padding_keys_do_not_affect_real_queries(backend, causal):
    attn = _module(backend)
    T = 8
    x = torch.randn(2, T, 32)
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, :3] = 0  # left padding
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(T), causal=causal, dtype=x.dtype,
                                key_padding=pad)
    x2 = x.clone()
    x2[1, :3] = torch.randn(3, 32) * 10
    with torch.no_grad():
        y, y2 = attn(x, mask), attn(x2, mask)
    assert torch.allclose(y[1, 3:], y2[1, 3:], atol=1e-5), f"{backend}: padding tokens changed real queries' outputs"
    assert torch.allclose(y[0], y2[0], atol=0), f"{backend}: row 0 changed although only row 1 changed"


# -- GQA head sharing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=lambda k: f"kv{k}")
@pytest.mark.parametrize("backend", list(ATTENTION_BACKENDS))
def test_gqa_module_equals_mha_with_repeated_kv_weights(backend, n_kv_head):
    """Query head h must use key/value head h // (H / K): an MHA module whose k/v projections repeat each
    GQA head's rows H / K times in a row gives the same output."""
    d_model, n_head, head_dim, T = 32, 4, 8, 6
    torch.manual_seed(0)
    gqa = Attention(d_model, AttentionConfig(n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, qkv_bias=True,
                                             out_bias=True, backend=backend)).eval()
    mha = Attention(d_model, AttentionConfig(n_head=n_head, n_kv_head=n_head, head_dim=head_dim, qkv_bias=True,
                                             out_bias=True, backend=backend)).eval()
    groups = n_head // n_kv_head
    qd, kvd = n_head * head_dim, n_kv_head * head_dim

    def expand(t: torch.Tensor, how: str) -> torch.Tensor:  # (K*Dh, ...) -> (H*Dh, ...)
        per_head = t.reshape(n_kv_head, head_dim, *t.shape[1:])
        rep = per_head.repeat_interleave(groups, 0) if how == "interleave" else per_head.repeat(groups, *[1] * t.ndim)
        return rep.reshape(n_head * head_dim, *t.shape[1:])

    def load(how: str) -> None:
        with torch.no_grad():
            for name in ("weight", "bias"):
                src = getattr(gqa.qkv, name)
                q, k, v = src.split([qd, kvd, kvd])
                getattr(mha.qkv, name).copy_(torch.cat([q, expand(k, how), expand(v, how)]))
            mha.o.load_state_dict(gqa.o.state_dict())

    x = torch.randn(2, T, d_model)
    pos_cfg = ModelConfig(d_model=d_model, attention=AttentionConfig(n_head=n_head, head_dim=head_dim))
    rope = RotaryPositions(pos_cfg, bidirectional=False).rotary(torch.arange(T)[None].expand(2, T))
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(T), causal=True, dtype=x.dtype)
    load("interleave")
    with torch.no_grad():
        diff = (gqa(x, mask, rope=rope) - mha(x, mask, rope=rope)).abs().max().item()
    assert diff < 1e-5, f"{backend}: GQA ({n_kv_head} kv heads) differs from MHA with repeated kv heads by {diff:.2e}"
    if groups > 1 and n_kv_head > 1:  # the test can tell head-sharing orders apart
        load("tile")
        with torch.no_grad():
            wrong = (gqa(x, mask, rope=rope) - mha(x, mask, rope=rope)).abs().max().item()
        assert wrong > 1e-3, "test is vacuous: tiling kv heads (h % K) gave the same output as interleaving"


def test_cross_attention_module_reads_keys_from_memory():
    torch.manual_seed(0)
    attn = Attention(32, AttentionConfig(n_head=4, n_kv_head=2, head_dim=8), cross=True).eval()
    x, memory = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    mask = AttentionMask()
    with torch.no_grad():
        y = attn(x, mask, memory=memory)
        y2 = attn(x, mask, memory=memory + 1.0)
    assert y.shape == (2, 3, 32), f"cross attention output shape {tuple(y.shape)}, expected (2, 3, 32)"
    assert not torch.allclose(y, y2, atol=1e-4), "cross attention output ignores the memory"


def _sliced_projection_forward(attn: Attention, x, mask, rope=None, memory=None) -> torch.Tensor:
    """Attention.forward written plainly: slice q, k, v out of the (B, heads, T, D) projections, rotate q and
    k with the reference RoPE. The oracle of the module's split-then-transpose layout."""
    B, T, _ = x.shape
    H, K, Dh = attn.n_head, attn.n_kv_head, attn.head_dim
    if attn.cross:
        q = attn.q(x).view(B, T, H, Dh).transpose(1, 2)
        kv = attn.kv(memory).view(B, memory.shape[1], 2 * K, Dh).transpose(1, 2)
        k, v = kv[:, :K], kv[:, K:]
    else:
        qkv = attn.qkv(x).view(B, T, H + 2 * K, Dh).transpose(1, 2)  # (B, H + 2K, T, D)
        q, k, v = qkv[:, :H], qkv[:, H:H + K], qkv[:, H + K:]
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
    y = attn.attend(q, k, v, mask, attn.scale, 0.0)
    return attn.o(y.transpose(1, 2).reshape(B, T, H * Dh))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["rope", "no-rope", "cross"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=lambda k: f"kv{k}")
def test_projection_split_is_bitwise_the_sliced_reference(n_kv_head, kind, autocast, monkeypatch):
    """The module splits its fused projections (split's backward is one cat) where the reference slices them
    (each slice's backward zero-fills a full-size gradient): output and every gradient must be equal bit for
    bit, so the change leaves training losses unchanged. (Torch ops only: in bf16 the fused RoPE kernel
    rounds differently, tests/nn/test_cpu_kernels.py.)"""
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    d_model, n_head, head_dim, B, T, S = 32, 4, 8, 2, 6, 5
    torch.manual_seed(0)
    attn = Attention(d_model, AttentionConfig(n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, qkv_bias=True),
                     cross=kind == "cross")
    x0, memory0 = torch.randn(B, T, d_model), torch.randn(B, S, d_model)
    pos_cfg = ModelConfig(d_model=d_model, attention=AttentionConfig(n_head=n_head, head_dim=head_dim))
    rope = RotaryPositions(pos_cfg, bidirectional=False).rotary(torch.arange(T)[None].expand(B, T))
    rope = rope if kind == "rope" else None
    mask = AttentionMask(is_causal=kind != "cross")
    results = []
    for forward in (_sliced_projection_forward, Attention.forward):
        attn.zero_grad()
        x, memory = x0.clone().requires_grad_(True), memory0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(attn, x, mask, rope=rope, memory=memory if kind == "cross" else None)
        y.float().square().sum().backward()
        results.append({"output": y.detach(), "x grad": x.grad,
                        **({"memory grad": memory.grad} if kind == "cross" else {}),
                        **{f"{n} grad": p.grad for n, p in attn.named_parameters()}})
    for name, ref in results[0].items():
        ours = results[1][name]
        assert torch.equal(ours, ref), f"{name} differs from the sliced reference by {(ours - ref).abs().max():.3e}"


# -- build_attention_mask fast path ---------------------------------------------------------------------------


def _build(T: int, past: int = 0, **kw) -> AttentionMask:
    S = past + T
    return build_attention_mask(q_idx=torch.arange(past, S), k_idx=torch.arange(S), dtype=torch.float32, **kw)


def test_is_causal_fast_path_only_when_legal():
    fast = _build(6, causal=True)
    assert fast.is_causal and fast.bias is None, "plain causal self-attention (T == S) must use is_causal, no tensor"
    assert not (m := _build(6, causal=False)).is_causal and m.bias is None, "bidirectional: no mask at all"
    decode = _build(1, past=5, causal=True)
    assert not decode.is_causal and decode.bias is None, "one query after the cache sees every key: no mask"
    illegal = {
        "key padding": _build(6, causal=True, key_padding=torch.ones(2, 6)),
        "sliding window": _build(6, causal=True, window=3),
        "position bias": _build(6, causal=True, position_bias=torch.zeros(1, 4, 6, 6)),
        "T != S (chunked prefill)": _build(3, past=4, causal=True),
        "decode with window": _build(1, past=5, causal=True, window=2),
    }
    for why, mask in illegal.items():
        assert not mask.is_causal and mask.bias is not None, f"{why}: is_causal must not be used, a bias is needed"


def test_chunked_prefill_mask_is_bottom_right_aligned():
    """SDPA's is_causal aligns the triangle top-left, which is wrong for T < S; the bias must not be."""
    mask = _build(3, past=4, causal=True)
    visible = mask.bias[0, 0] == 0  # (T, S)
    expected = torch.arange(7)[None, :] <= torch.arange(4, 7)[:, None]
    assert torch.equal(visible, expected), f"chunked prefill visibility\n{visible.int()}\nexpected\n{expected.int()}"
    q, k, v = _qkv(1, 2, 3, 7)
    right = sdpa_attention(q, k, v, mask, D**-0.5)
    wrong = sdpa_attention(q, k, v, AttentionMask(is_causal=True), D**-0.5)
    assert not torch.allclose(right, wrong, atol=1e-3), "test is vacuous: top-left causal equals the right mask"


def test_mask_bias_values_shape_and_dtype():
    pad = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    alibi = _alibi(torch.arange(4), torch.arange(4))
    for dtype in (torch.float32, torch.bfloat16):
        mask = build_attention_mask(q_idx=torch.arange(4), k_idx=torch.arange(4), causal=True, dtype=dtype,
                                    key_padding=pad, position_bias=alibi)
        assert mask.bias.dtype == dtype and mask.bias.shape == (2, H, 4, 4), \
            f"bias {mask.bias.dtype} {tuple(mask.bias.shape)}, expected {dtype} (2, {H}, 4, 4)"
        lowest = torch.finfo(dtype).min
        assert (mask.bias[1, :, :, 0] == lowest).all(), "padding key 0 of row 1 must hold the dtype's minimum"
        assert (mask.bias[:, :, 0, 1:] == lowest).all(), "future keys must hold the dtype's minimum"
        assert torch.equal(mask.bias[0, :, 3, :], alibi[0, :, 3, :].to(dtype)), "visible entries keep the ALiBi bias"


def test_softmax_scale_is_used():
    """AttentionConfig.softmax_scale (T5 uses 1.0) replaces 1/sqrt(head_dim)."""
    torch.manual_seed(0)
    attn = Attention(32, AttentionConfig(n_head=4, n_kv_head=4, head_dim=8, softmax_scale=1.0))
    assert attn.scale == 1.0
    assert _module("eager").scale == pytest.approx(1 / math.sqrt(8))
