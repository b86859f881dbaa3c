"""Encoder-decoder models (T5, the original Transformer): masks, encoder reuse, KV cache, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.nn.kv_cache import KVCache

PRESETS = ["debug-t5", "debug-t5-v1.1", "debug-transformer"]
VOCAB = 256


def _model(preset: str, **overrides) -> torch.nn.Module:
    model = lmforge.build_model(lmforge.ModelConfig.from_preset(preset, dropout=0.0, **overrides), seed=0)
    with torch.no_grad():  # larger weights than the init, so small mistakes show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(2, VOCAB, (2, 11), generator=g)
    tgt = torch.randint(2, VOCAB, (2, 7), generator=g)
    src_mask = torch.ones_like(src)
    src_mask[1, 8:] = 0  # right-padded source
    return src, tgt, src_mask


@pytest.mark.parametrize("preset", PRESETS)
def test_decoder_is_causal_and_reads_the_source(preset):
    model = _model(preset)
    src, tgt, _ = _batch()
    with torch.no_grad():
        base = model(src, tgt).logits
        later = tgt.clone()
        later[:, -1] = (later[:, -1] + 1) % VOCAB
        assert torch.allclose(base[:, :-1], model(src, later).logits[:, :-1], atol=1e-5), "decoder saw the future"
        other_src = src.clone()
        other_src[:, 0] = (other_src[:, 0] + 1) % VOCAB
        assert not torch.allclose(base[:, 0], model(other_src, tgt).logits[:, 0]), "cross-attention ignores source"


@pytest.mark.parametrize("preset", PRESETS)
def test_source_padding_is_masked(preset):
    model = _model(preset)
    src, tgt, mask = _batch()
    garbage = src.clone()
    garbage[1, 8:] = 3
    with torch.no_grad():
        a = model(src, tgt, attention_mask=mask).logits[1]
        b = model(garbage, tgt, attention_mask=mask).logits[1]
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_encoder_output_reuse_and_cached_decoding_equal_one_call(preset):
    model = _model(preset)
    src, tgt, mask = _batch()
    with torch.no_grad():
        full = model(src, tgt, attention_mask=mask).logits
        memory = model.encode(src, mask)
        reused = model(decoder_input_ids=tgt, memory=memory, attention_mask=mask).logits
        assert (full - reused).abs().max() < 1e-6
        cache = KVCache.for_model(model.config, batch=2, max_len=tgt.shape[1])
        steps = []
        for t in range(tgt.shape[1]):  # one decoder token at a time over the cache
            steps.append(model(decoder_input_ids=tgt[:, t:t + 1], memory=memory, attention_mask=mask,
                               cache=cache).logits)
            cache.advance(1)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_missing_inputs_explain_themselves():
    model = _model("debug-t5")
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        model(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="pass input_ids .* or memory"):
        model(decoder_input_ids=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("preset", PRESETS)
def test_seq2seq_loss_falls_and_reaches_every_parameter(preset):
    model = lmforge.build_model(lmforge.ModelConfig.from_preset(preset, dropout=0.0), seed=0).train()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(2, VOCAB, (8, 10), generator=g)
    target = src  # a learnable mapping: copy the source
    decoder_input = torch.cat([torch.zeros(8, 1, dtype=torch.long), target[:, :-1]], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        logits = model(src, decoder_input).logits
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert not missing, f"{preset}: no gradient reaches {missing}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"{preset}: loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_t5_fan_in_init_gives_unit_scale_activations():
    """With T5's tied head (hidden * d^-0.5) a N(0, 0.02) init would start at near-zero logits."""
    cfg = lmforge.ModelConfig.from_preset("debug-t5")
    assert cfg.init_scheme == "fan_in"
    model = lmforge.build_model(cfg, seed=0).eval()
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.1)
    up = model.encoder.blocks[0].mlp.up.weight
    assert up.std().item() == pytest.approx(cfg.d_model**-0.5, rel=0.1)
    q_rows = cfg.attention.n_head * cfg.attention.head_dim
    q = model.encoder.blocks[0].attn.qkv.weight[:q_rows]
    assert q.std().item() == pytest.approx((cfg.d_model * cfg.attention.head_dim) ** -0.5, rel=0.1)
    src, tgt, _ = _batch()
    with torch.no_grad():
        assert 0.2 < model(src, tgt).logits.std().item() < 5.0
