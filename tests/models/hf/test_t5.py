"""T5 vs Hugging Face transformers on the same weights, both directions, fp32.

HF tiny random `T5ForConditionalGeneration` / `T5EncoderModel`s go through `lmforge.load`; our models go
through `lmforge.save_hf` and back into transformers. Sources are longer than the relative buckets' exact
range (8 buckets, max distance 20, 30 source tokens), so the logarithmic buckets and the clamp at
max_distance are exercised; source and target both carry padding, and only real positions are compared.
"""

from __future__ import annotations

import pytest
import torch

import lmforge

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 97
SMALL = dict(vocab_size=VOCAB, d_model=32, num_heads=4, relative_attention_num_buckets=8,
             relative_attention_max_distance=20)

# name -> (HF class, T5Config kwargs, untie the head by hand)
HF_CASES = {
    "v1.0-tied-relu": ("T5ForConditionalGeneration", dict(SMALL, d_kv=8, d_ff=48, num_layers=2), False),
    "v1.1-untied-gated-gelu": ("T5ForConditionalGeneration", dict(
        SMALL, d_kv=12, d_ff=40, num_layers=2, num_decoder_layers=3, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False), True),
    # transformers 5 ties lm_head to `shared` even for tie_word_embeddings=False and only drops the scaling
    "v1.1-as-transformers-5-builds-it": ("T5ForConditionalGeneration", dict(
        SMALL, d_kv=8, d_ff=40, num_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False), False),
    "encoder-gated-silu": ("T5EncoderModel", dict(SMALL, d_kv=12, d_ff=40, num_layers=3,
                                                  feed_forward_proj="gated-silu"), False),
}

# name -> (preset, overrides)
OUR_CASES = {
    "debug-t5": ("debug-t5", {}),
    "debug-t5-v1.1": ("debug-t5-v1.1", {}),
    "debug-t5-encoder": ("debug-t5", dict(arch="encoder", head="none", head_input_scale=1.0)),
    "debug-t5-tied-unscaled": ("debug-t5", dict(head_input_scale=1.0, position={"relative_buckets": 8,
                                                                                "relative_max_distance": 20})),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Larger-than-init random weights (relative biases ~ N(0, 1), so positions matter), so a permuted
    or misplaced tensor cannot hide in tiny outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            big = "relative_attention_bias" in name or "positions.bias" in name
            p.copy_(noise * (1.0 if big else 0.1) + (1.0 if p.ndim == 1 else 0.0))


def _batch(seed: int = 1):
    """Source (3, 30) and target (3, 25) ids with right and left padding on both sides."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, VOCAB, (3, 30), generator=g)
    tgt = torch.randint(0, VOCAB, (3, 25), generator=g)
    src_mask, tgt_mask = torch.ones_like(src), torch.ones_like(tgt)
    src_mask[1, -7:] = 0
    src_mask[2, :3] = 0
    tgt_mask[1, -5:] = 0
    tgt_mask[2, :2] = 0
    return src, src_mask, tgt, tgt_mask


def _diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    valid = mask.bool()
    return (a[valid] - b[valid]).abs().max().item()


@torch.no_grad()
def _compare_seq2seq(ours, hf) -> dict[str, float]:
    src, src_mask, tgt, tgt_mask = _batch()
    theirs = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    out = ours(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
    memory = ours.encode(src, src_mask)
    reused = ours(decoder_input_ids=tgt, memory=memory, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
    assert torch.equal(reused.logits, out.logits), "model(memory=model.encode(...)) differs from the one-call form"
    # the masks must change real positions' outputs, or the test masks nothing
    unmasked = ours(src, tgt).logits
    source_only = ours(src, tgt, attention_mask=src_mask).logits
    assert not torch.allclose(unmasked[1], source_only[1], atol=1e-3), "source padding had no effect"
    assert not torch.allclose(source_only[2, 2:], out.logits[2, 2:], atol=1e-3), "target padding had no effect"
    plain = hf(input_ids=src, decoder_input_ids=tgt).logits
    return {
        "logits": _diff(out.logits, theirs.logits, tgt_mask),
        "encoder": _diff(memory, theirs.encoder_last_hidden_state, src_mask),
        "unpadded": (unmasked - plain).abs().max().item(),
    }


@torch.no_grad()
def _compare_encoder(ours, hf) -> dict[str, float]:
    src, src_mask, _, _ = _batch()
    out = ours(src, attention_mask=src_mask)
    assert out.logits is None
    unmasked = ours(src).hidden
    assert not torch.allclose(unmasked[1, :20], out.hidden[1, :20], atol=1e-3), "source padding had no effect"
    return {
        "hidden": _diff(out.hidden, hf(input_ids=src, attention_mask=src_mask).last_hidden_state, src_mask),
        "unpadded": (unmasked - hf(input_ids=src).last_hidden_state).abs().max().item(),
    }


def _check(name: str, diffs: dict[str, float]) -> None:
    print(f"{name}: max |ours - HF| " + "  ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"{name}: outputs differ from transformers by {bad} > {TOL}"


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_to_ours(case, tmp_path):
    cls_name, kwargs, untie = HF_CASES[case]
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(transformers.T5Config(**kwargs)).eval()
    if untie:
        hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = lmforge.load(tmp_path)
    cfg = ours.config
    assert not ours.training and cfg.attention.softmax_scale == 1.0 and cfg.position.relative_buckets == 8
    if cls_name == "T5EncoderModel":
        assert type(ours).__name__ == "EncoderModel" and cfg.head == "none"
        _check(case, _compare_encoder(ours, hf))
        return
    assert type(ours).__name__ == "EncoderDecoderLM"
    assert cfg.tie_embeddings == (not untie) and cfg.n_decoder_layer == kwargs.get("num_decoder_layers", 2)
    assert cfg.head_input_scale == (1.0 if "v1.1" in case else 32**-0.5)
    _check(case, _compare_seq2seq(ours, hf))


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_ours_to_hf(case, tmp_path):
    preset, overrides = OUR_CASES[case]
    cfg = lmforge.ModelConfig.from_preset(preset, vocab_size=VOCAB, **overrides)
    ours = lmforge.build_model(cfg, seed=0).eval()
    _randomize(ours)
    lmforge.save_hf(ours, tmp_path)
    cls = transformers.T5EncoderModel if cfg.arch == "encoder" else transformers.AutoModelForSeq2SeqLM
    hf, info = cls.from_pretrained(tmp_path, attn_implementation="eager", output_loading_info=True)
    hf.eval()
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert type(hf).__name__ == ("T5EncoderModel" if cfg.arch == "encoder" else "T5ForConditionalGeneration")
    _check(case, _compare_encoder(ours, hf) if cfg.arch == "encoder" else _compare_seq2seq(ours, hf))
    # and the round trip back into lmforge gives the identical model
    again = lmforge.load(tmp_path)
    mine, theirs = ours.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), f"{name} changed in the save/load round trip"


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_transformers_4_checkpoint_with_tied_copies_loads(version, tmp_path):
    """transformers 4 wrote `tie_word_embeddings` (False for v1.1) but no `scale_decoder_outputs`, and its
    checkpoints may hold copies of `shared` (stacks' embed_tokens, a tied lm_head) and a stray cross bias."""
    import json

    from safetensors.torch import load_file, save_file

    v11 = version == "v1.1"
    kwargs = dict(SMALL, d_kv=8, d_ff=40, num_layers=2, feed_forward_proj="gated-gelu" if v11 else "relu",
                  tie_word_embeddings=not v11)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
    if v11:
        hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["scale_decoder_outputs"]
    config["tie_word_embeddings"] = not v11
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "model.safetensors")
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") + (() if v11 else ("lm_head.weight",)):
        state[key] = state["shared.weight"].clone()
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(8, 4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = lmforge.load(tmp_path)
    assert ours.config.tie_embeddings != v11 and ours.config.head_input_scale == (1.0 if v11 else 32**-0.5)
    _check(f"transformers-4-{version}", _compare_seq2seq(ours, hf))


def test_configs_t5_cannot_express_are_refused(tmp_path):
    for overrides, what in (
        (dict(mlp={"bias": True}), "T5 has no biases"),
        (dict(norm={"placement": "post"}, final_norm=False), "pre-RMSNorm"),
        (dict(position={"kind": "learned"}), "relative position buckets"),
        (dict(attention={"softmax_scale": None}), "unscaled multi-head attention"),
    ):
        cfg = lmforge.ModelConfig.from_preset("debug-t5", hf_model_type="t5", **overrides)
        with pytest.raises(ValueError, match=f"cannot be written as Hugging Face 't5': .*{what}"):
            lmforge.save_hf(lmforge.build_model(cfg), tmp_path)
    cfg = lmforge.ModelConfig.from_preset("debug-t5-v1.1", head_input_scale=64**-0.5)
    with pytest.raises(ValueError, match="only before a tied head"):
        lmforge.save_hf(lmforge.build_model(cfg), tmp_path)


def test_unsupported_t5_heads_explain_themselves(tmp_path):
    config = transformers.T5Config(**SMALL, d_kv=8, d_ff=48, num_layers=1)
    transformers.T5ForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="architecture 'T5ForSequenceClassification' is not supported"):
        lmforge.load(tmp_path)
