"""KV cache: a prefill plus decode steps (or chunks) through the cache must reproduce the full forward's
logits and greedy tokens, for every decoder debug preset and cache kind (static, dynamic, and the ring buffer
for the sliding-window preset); the cache stores K heads, refuses overflow, grows, crops and reorders."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.nn.kv_cache import DynamicKVCache, KVCache, SlidingWindowKVCache, make_cache
from lmforge.nn.positions import apply_rope

PRESETS = ["debug-gpt2", "debug-llama", "debug-mistral", "debug-mixtral", "debug-qwen2"]
TOL = 1e-5  # fp32 logits of std ~0.8
SEQ = 20  # longer than debug-mistral's sliding window of 8


def _model(name: str, **overrides):
    """The preset built as in production, then re-drawn with std 0.1 weights (and random biases): at init
    scale (std 0.02) attention is near uniform, and a wrong position or key could hide below TOL."""
    cfg = lmforge.ModelConfig.from_preset(name, **overrides)
    model = lmforge.build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2 or "norm" not in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cfg, model


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _kinds(name: str) -> list[str]:
    return ["static", "dynamic"] + (["sliding"] if name == "debug-mistral" else [])


def _run_chunks(model, cfg, ids: torch.Tensor, sizes: list[int], kind: str = "static", **kw) -> torch.Tensor:
    """Feed ids through a fresh cache in chunks of the given sizes; the caller's loop advances the cache."""
    cache = make_cache(kind, cfg, ids.shape[0], ids.shape[1])
    outs, start = [], 0
    with torch.no_grad():
        for n in sizes:
            outs.append(model(ids[:, start:start + n], cache=cache, **kw).logits)
            assert cache.pos == start, "the model must not advance the cache; the engine does"
            cache.advance(n)
            start += n
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_matches_full_forward(name):
    cfg, model = _model(name)
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
    prefix = 6
    for kind in _kinds(name):
        cached = _run_chunks(model, cfg, ids, [prefix] + [1] * (SEQ - prefix), kind)
        diff = (cached - full).abs().max(dim=-1).values.max(dim=0).values  # (T,)
        assert diff.max() < TOL, f"{name}, {kind} cache: cached decode differs from the full forward by " \
            f"{diff.max():.2e}; worst position {int(diff.argmax())} (prefix {prefix})"


@pytest.mark.parametrize("name", PRESETS)
def test_chunked_prefill_matches_full_forward(name):
    """Several tokens after a cached prefix: the mask must align causality to the bottom right (T < S)."""
    cfg, model = _model(name)
    ids = _ids(seed=2)
    with torch.no_grad():
        full = model(ids).logits
    for sizes in ([5, 3, 4, 1, 7], [1, 2, 3, 14], [10, 10]):
        for kind in _kinds(name):
            cached = _run_chunks(model, cfg, ids, sizes, kind)
            diff = (cached - full).abs().max().item()
            assert diff < TOL, f"{name}, {kind} cache: chunked prefill {sizes} differs from the full forward " \
                f"by {diff:.2e}"


@pytest.mark.parametrize("name", PRESETS)
def test_cache_comparison_detects_a_position_off_by_one(name):
    """Guards the tests above against being vacuous: a decode step at the wrong position must show up."""
    cfg, model = _model(name)
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(cfg, 2, SEQ)
        model(ids[:, :-1], cache=cache)
        cache.advance(SEQ - 1)
        wrong = model(ids[:, -1:], cache=cache, positions=torch.full((2, 1), SEQ)).logits  # should be SEQ - 1
    diff = (wrong[:, 0] - full[:, -1]).abs().max().item()
    assert diff > 1e-3, f"{name}: a decode step at position {SEQ} instead of {SEQ - 1} changed logits by only {diff}"


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_tokens_with_and_without_cache_are_identical(name):
    cfg, model = _model(name)
    prompt, steps = _ids(seq=5, seed=3), 12
    with torch.no_grad():
        seq = prompt
        for _ in range(steps):  # no cache: recompute the whole sequence every step
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
        plain = seq[:, prompt.shape[1]:]

        cache = KVCache.for_model(cfg, prompt.shape[0], prompt.shape[1] + steps)
        logits = model(prompt, cache=cache).logits
        cache.advance(prompt.shape[1])
        tokens = []
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            logits = model(nxt, cache=cache).logits
            cache.advance(1)
        cached = torch.cat(tokens, dim=1)
    assert torch.equal(plain, cached), f"{name}: greedy tokens differ\nno cache: {plain.tolist()}\n" \
        f"cache:    {cached.tolist()}"


@pytest.mark.parametrize("name", PRESETS)
def test_left_padded_batch_decode_matches_full_forward(name):
    """Left padding through the cache: attention_mask covers cached + new tokens, positions skip the pads."""
    cfg, model = _model(name)
    ids = _ids(batch=3, seed=4)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, positions=positions).logits
        cache = KVCache.for_model(cfg, 3, SEQ)
        outs, start = [], 0
        for n in [7] + [1] * (SEQ - 7):
            end = start + n
            outs.append(model(ids[:, start:end], cache=cache, attention_mask=mask[:, :end],
                              positions=positions[:, start:end]).logits)
            cache.advance(n)
            start = end
    cached = torch.cat(outs, dim=1)
    real = mask.bool()
    diff = (cached[real] - full[real]).abs().max().item()
    assert diff < TOL, f"{name}: left-padded cached decode differs from the full forward by {diff:.2e}"


def test_sliding_window_is_exercised_by_the_mistral_preset():
    cfg, model = _model("debug-mistral")
    window = cfg.attention.sliding_window
    assert window is not None and SEQ > window, "the mistral preset must have a window shorter than the test sequence"
    _, unwindowed = _model("debug-mistral", attention={"sliding_window": None})
    unwindowed.load_state_dict(model.state_dict())
    ids = _ids()
    with torch.no_grad():
        a, b = model(ids).logits, unwindowed(ids).logits
    assert torch.allclose(a[:, :window], b[:, :window], atol=1e-6), "positions inside the window must not change"
    assert (a[:, window:] - b[:, window:]).abs().max() > 1e-3, "the sliding window had no effect past the window"


# -- the cache object -------------------------------------------------------------------------------------


def test_update_beyond_max_len_raises_a_helpful_error():
    cache = KVCache(n_layer=1, batch=1, n_kv_head=2, head_dim=4, max_len=8)
    cache.update(0, torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))
    cache.advance(6)
    with pytest.raises(ValueError, match=r"holds 8 positions but 9 are needed.*larger max_len"):
        cache.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    k, _ = cache.update(0, torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))  # exactly full is fine
    assert k.shape == (1, 2, 8, 4)


def test_model_forward_past_max_len_raises():
    cfg, model = _model("debug-llama")
    cache = KVCache.for_model(cfg, 1, 4)
    with pytest.raises(ValueError, match="max_len"):
        model(_ids(batch=1, seq=5), cache=cache)


@pytest.mark.parametrize("name", ["debug-gpt2", "debug-llama", "debug-qwen2"])
def test_cache_stores_kv_heads_not_query_heads(name):
    """GQA/MQA: the cache holds n_kv_head heads (4 / 2 / 1 here), shared by all query heads."""
    cfg, model = _model(name)
    a = cfg.attention
    B, T, max_len = 2, 5, 12
    cache = KVCache.for_model(cfg, B, max_len)
    assert len(cache.k) == len(cache.v) == cfg.n_layer
    for t in cache.k + cache.v:
        assert t.shape == (B, a.n_kv_head, max_len, a.head_dim), \
            f"{name}: cache tensor {tuple(t.shape)}, expected (B, n_kv_head={a.n_kv_head}, max_len, head_dim)"
    ids = _ids(batch=B, seq=T)
    with torch.no_grad():
        model(ids, cache=cache)
        # layer 0's keys, recomputed by hand: embed (+ learned positions) -> norm -> k projection -> RoPE
        x = model.embed(ids) * cfg.embed_scale
        positions = torch.arange(T)[None].expand(B, T)
        x = model.positions.add_to_embeddings(x, positions)
        attn = model.blocks[0].attn
        _, k, v = attn.qkv(model.blocks[0].attn_norm(x)).split(attn.split, dim=-1)
        k = k.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        v = v.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        rope = model.positions.rotary(positions)
        if rope is not None:
            k = apply_rope(k, *rope)
    assert torch.allclose(cache.k[0][:, :, :T], k, atol=1e-6), f"{name}: cached keys are not layer 0's keys"
    assert torch.allclose(cache.v[0][:, :, :T], v, atol=1e-6), f"{name}: cached values are not layer 0's values"
    assert (cache.k[0][:, :, T:] == 0).all(), "positions past the written ones must stay untouched"


def test_crop_and_reorder():
    cache = KVCache(n_layer=2, batch=3, n_kv_head=1, head_dim=2, max_len=4)
    k = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2)  # row b holds b everywhere
    for layer in range(2):
        cache.update(layer, k, k + 10)
    cache.advance(2)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[1][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache.v[0][:, 0, 1, 1].tolist() == [12.0, 12.0, 10.0]
    cache.crop(1)
    assert cache.pos == 1
    keys, _ = cache.update(0, torch.full((3, 1, 1, 2), 7.0), torch.zeros(3, 1, 1, 2))
    assert keys.shape[2] == 2 and keys[:, 0, 1, 0].tolist() == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(5)


def test_dynamic_cache_grows_geometrically_and_keeps_its_contents():
    cache = DynamicKVCache(n_layer=1, batch=1, n_kv_head=1, head_dim=2)
    capacities, n = set(), 100
    for p in range(n):
        k = torch.full((1, 1, 1, 2), float(p))
        keys, values = cache.update(0, k, -k)
        cache.advance(1)
        capacities.add(cache.k[0].shape[2])
        assert keys[0, 0, :, 0].tolist() == [float(i) for i in range(p + 1)], f"contents lost at position {p}"
        assert torch.equal(values, -keys)
    assert len(capacities) <= 8, f"capacity must double, not grow per token: saw {sorted(capacities)}"
    assert max(capacities) < 2 * n
    cache.crop(10)  # like the static cache: later writes overwrite from position 10
    keys, _ = cache.update(0, torch.full((1, 1, 3, 2), -1.0), torch.zeros(1, 1, 3, 2))
    assert keys.shape[2] == 13 and keys[0, 0, 9:, 0].tolist() == [9.0, -1.0, -1.0, -1.0]


def test_ring_buffer_slots_hold_the_newest_positions():
    cache = SlidingWindowKVCache(n_layer=1, batch=1, n_kv_head=1, head_dim=1, window=3, spare=1)  # 4 slots
    assert cache.key_positions(2).tolist() == [-4, -3, -2, -1, 0, 1], "empty slots read as negative positions"
    for p in range(7):
        cache.update(0, torch.full((1, 1, 1, 1), float(p)), torch.zeros(1, 1, 1, 1))
        cache.advance(1)
    assert cache.k[0].flatten().tolist() == [4.0, 5.0, 6.0, 3.0], "position p lives in slot p % 4"
    assert cache.key_positions(1).tolist() == [4, 5, 6, 7], "a single token is written first: slot 3 holds 7"
    assert cache.key_positions(3).tolist() == [4, 5, 6, 3, 7, 8, 9], "a chunk sees the ring, then itself"
    keys, _ = cache.update(0, torch.tensor([7.0, 8.0, 9.0]).view(1, 1, 3, 1), torch.zeros(1, 1, 3, 1))
    assert keys.flatten().tolist() == [4.0, 5.0, 6.0, 3.0, 7.0, 8.0, 9.0]
    assert cache.k[0].flatten().tolist() == [8.0, 9.0, 6.0, 7.0], "the chunk's last 4 keys are kept"


def test_ring_buffer_crop_and_its_limit():
    cache = SlidingWindowKVCache(n_layer=1, batch=1, n_kv_head=1, head_dim=1, window=4, spare=2)
    cache.advance(20)
    cache.crop(17)  # 3 back = spare + 1: positions 14..16 (the window before 17) are still held
    assert cache.pos == 17
    with pytest.raises(ValueError, match=r"back to 13.*hold positions 11\.\.16.*needs 10\.\.12.*spare >= 3"):
        cache.crop(13)
    with pytest.raises(ValueError, match="cannot crop the KV cache to 18"):
        cache.crop(18)
    short = SlidingWindowKVCache(n_layer=1, batch=1, n_kv_head=1, head_dim=1, window=4)
    short.advance(3)
    short.crop(0)  # nothing overwritten yet: any crop works before the ring wraps


def test_cache_errors_name_the_fix():
    cfg = lmforge.ModelConfig.from_preset("debug-llama")
    with pytest.raises(ValueError, match=r"cache='paged' is not a cache kind; valid: \['auto', 'static', 'dynamic'"):
        make_cache("paged", cfg, 1, 8)
    with pytest.raises(ValueError, match="needs a model with attention.sliding_window"):
        make_cache("sliding", cfg, 1, 8)
    with pytest.raises(ValueError, match="window >= 1"):
        SlidingWindowKVCache(n_layer=1, batch=1, n_kv_head=1, head_dim=1, window=0)
    with pytest.raises(ValueError, match="spare=-1"):
        SlidingWindowKVCache(n_layer=1, batch=1, n_kv_head=1, head_dim=1, window=2, spare=-1)
    assert type(make_cache("auto", lmforge.ModelConfig.from_preset("debug-mistral"), 1, 8)) is SlidingWindowKVCache
    assert type(make_cache("auto", cfg, 1, 8)) is KVCache


def test_reorder_moves_cross_attention_keys_and_values():
    cache = KVCache(n_layer=2, batch=3, n_kv_head=1, head_dim=2, max_len=4)
    rows = torch.arange(3.0)[:, None, None, None].expand(3, 1, 5, 2)  # (B, K, S, D), row b holds b
    cache.cross[1] = (rows, rows + 10)
    cache.reorder(torch.tensor([2, 0, 0]))
    assert cache.cross[0] is None
    assert cache.cross[1][0][:, 0, 0, 0].tolist() == [2.0, 0.0, 0.0]
    assert cache.cross[1][1][:, 0, 4, 1].tolist() == [12.0, 10.0, 10.0]
