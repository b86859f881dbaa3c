"""BART and Marian: our encoder-decoder vs transformers on the same weights, both directions, fp32.

HF tiny random models go through `lmforge.load`; our models go through `lmforge.save_hf` and
`AutoModelForSeq2SeqLM.from_pretrained`. Source and target batches carry padding that really masks keys,
and only real positions are compared.
"""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.models.hf import from_hf_state

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 99
SHAPE = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
HF_CASES = {
    "bart": ("BartConfig", dict(scale_embedding=False)),
    "bart-scaled-relu": ("BartConfig", dict(scale_embedding=True, activation_function="relu")),
    "marian": ("MarianConfig", dict(scale_embedding=True, activation_function="swish")),
}
# Our side, in our own vocabulary: the original Transformer preset reshaped to the tiny size.
OURS = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_decoder_layer=3, attention={"n_head": 4},
            mlp={"d_ff": 37, "activation": "gelu"}, norm={"eps": 1e-5}, embed_scale=32**0.5, lm_head_bias=True,
            pad_token_id=1, bos_token_id=0, eos_token_id=2)
BART = dict(position={"kind": "learned", "offset": 2, "max_seq_len": 64}, embed_norm=True, hf_model_type="bart")
MARIAN = dict(position={"kind": "sinusoidal", "sinusoidal_layout": "halves", "max_seq_len": 64},
              hf_model_type="marian")
OUR_CASES = {
    "bart": {**OURS, **BART, "embed_scale": 1.0},
    "bart-scaled-untied": {**OURS, **BART, "tie_embeddings": False},
    "marian": {**OURS, **MARIAN, "mlp": {"d_ff": 37, "activation": "silu"}},
    # The 2017 Transformer (ReLU, sqrt(d) scale, no logits bias) with Marian's sinusoid layout.
    "transformer-as-marian": dict(preset="debug-transformer", position={"sinusoidal_layout": "halves"},
                                  norm={"eps": 1e-5}, hf_model_type="marian", vocab_size=VOCAB),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Larger-than-init random weights (the logits bias buffer too), so a permuted tensor cannot hide.
    Frozen parameters (Marian's sinusoid table in transformers) keep their fixed values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        head = getattr(model, "head", None)
        if head is not None and head.bias is not None:  # ours: a bias, not a norm gain
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.5)


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(3, VOCAB, (3, 11), generator=g), torch.randint(3, VOCAB, (3, 9), generator=g)
    src_mask, tgt_mask = torch.ones_like(src), torch.ones_like(tgt)
    src_mask[1, -4:] = 0  # right-padded source: every target row cross-attends past it
    src_mask[2, :2] = 0  # left padding too: positions stay arange in both libraries
    tgt_mask[2, :3] = 0  # left-padded target: the later (real) queries would otherwise see these keys
    return src, tgt, src_mask, tgt_mask


def _compare(ours, theirs, src, tgt, src_mask, tgt_mask) -> float:
    with torch.no_grad():
        plain = (ours(src, tgt).logits - theirs(input_ids=src, decoder_input_ids=tgt).logits).abs().max().item()
        a = ours(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask).logits
        b = theirs(input_ids=src, decoder_input_ids=tgt, attention_mask=src_mask,
                   decoder_attention_mask=tgt_mask).logits
        unmasked = ours(src, tgt).logits
    real = tgt_mask.bool()
    masked = (a[real] - b[real]).abs().max().item()
    assert not torch.allclose(unmasked[1], a[1], atol=1e-3), "source padding had no effect"
    assert not torch.allclose(unmasked[2, 3:], a[2, 3:], atol=1e-3), "target padding had no effect"
    return max(plain, masked)


def _hf_model(case: str):
    cls_name, kwargs = HF_CASES[case]
    config = getattr(transformers, cls_name)(**SHAPE, **kwargs)
    torch.manual_seed(0)
    hf = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager").eval()
    _randomize(hf)
    return hf


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_ours(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    ours = lmforge.load(tmp_path)
    assert type(ours).__name__ == "EncoderDecoderLM" and not ours.training
    diff = _compare(ours, hf, *_batch())
    print(f"HF -> ours {case}: max |ours - HF| = {diff:.2e}")
    assert diff <= TOL, f"{case}: logits differ from transformers by {diff:.3e} > {TOL}"
    # The in-memory state dict also holds the tied embedding copies and (Marian) the sinusoid tables.
    again = from_hf_state(hf.config.to_dict(), hf.state_dict())
    for (name, x), (_, y) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(x, y), f"{name}: save_pretrained folder and in-memory state dict disagree"


@pytest.mark.parametrize("case", sorted(OUR_CASES))
def test_ours_to_hf(case, tmp_path):
    overrides = dict(OUR_CASES[case])
    preset = overrides.pop("preset", "debug-transformer")
    cfg = lmforge.ModelConfig.from_preset(preset, **overrides)
    ours = lmforge.build_model(cfg, seed=0).eval()
    _randomize(ours)
    lmforge.save_hf(ours, tmp_path)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.model_type == cfg.hf_model_type
    diff = _compare(ours, hf, *_batch())
    print(f"ours -> HF {case}: max |ours - HF| = {diff:.2e}")
    assert diff <= TOL, f"{case}: transformers' logits differ from ours by {diff:.3e} > {TOL}"
    again = lmforge.load(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} changed in the save/load round trip"


def test_interleaved_sinusoids_are_not_marian(tmp_path):
    cfg = lmforge.ModelConfig.from_preset("debug-transformer")
    assert lmforge.models.hf.infer_model_type(cfg) == "marian"
    with pytest.raises(ValueError, match="cannot be written as Hugging Face 'marian'.*sinusoidal_layout='halves'"):
        lmforge.save_hf(lmforge.build_model(cfg), tmp_path)
    halves = lmforge.ModelConfig.from_preset("debug-transformer", position={"sinusoidal_layout": "halves"})
    with pytest.raises(ValueError, match="eps=1e-05 \\(got norm.eps=1e-06\\)"):
        lmforge.save_hf(lmforge.build_model(halves), tmp_path)


def test_foreign_checkpoints_explain_themselves():
    hf = _hf_model("marian")
    state = dict(hf.state_dict())
    table = state["model.encoder.embed_positions.weight"]
    state["model.encoder.embed_positions.weight"] = table.view(64, 16, 2).transpose(1, 2).reshape(64, 32)
    with pytest.raises(ValueError, match="differs from Marian's sinusoid table"):
        from_hf_state(hf.config.to_dict(), state)
    state = dict(hf.state_dict(), **{"model.decoder.embed_tokens.weight": torch.zeros(VOCAB, 32)})
    with pytest.raises(ValueError, match="separate encoder/decoder token embeddings are not supported"):
        from_hf_state(hf.config.to_dict(), state)
    with pytest.raises(ValueError, match="share_encoder_decoder_embeddings=False"):
        from_hf_state({**hf.config.to_dict(), "share_encoder_decoder_embeddings": False}, hf.state_dict())
    bart = _hf_model("bart").config.to_dict()
    with pytest.raises(ValueError, match="normalize_before=True is not supported"):
        from_hf_state({**bart, "normalize_before": True}, {})
    with pytest.raises(ValueError, match="'BartForSequenceClassification' is not supported"):
        from_hf_state({**bart, "architectures": ["BartForSequenceClassification"]}, {})
