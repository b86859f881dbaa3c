"""Our models vs Hugging Face transformers on the same weights, both directions, fp32.

HF tiny random models are converted through the production loader (`lmforge.load`), and our
models are written with `lmforge.save_hf` and read back by `AutoModelForCausalLM`.
"""

from __future__ import annotations

import pytest
import torch

import lmforge

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 97

# name -> (HF config class, kwargs). Each covers a feature the issue names.
HF_CASES = {
    "gpt2-tied": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-untied": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False,
                                       activation_function="gelu")),
    "llama-gqa-llama3-rope-biases": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        attention_bias=True, mlp_bias=True, max_position_embeddings=256,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-mqa-linear-rope-tied": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama-head-dim": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        head_dim=16)),
    "mistral-sliding-window": ("MistralConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=4)),
    "qwen2-qkv-bias": ("Qwen2Config", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True)),
    "mixtral-moe": ("MixtralConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
}

OUR_PRESETS = ["debug-gpt2", "debug-llama", "debug-mistral", "debug-mixtral", "debug-qwen2"]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Larger-than-init random weights, so a transposed or permuted tensor cannot hide in tiny logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def _batch(seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, seq), generator=g)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, :4] = 0  # left padding that really masks keys
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _compare(ours, theirs, ids, mask, positions) -> float:
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits
        diff_plain = (a - b).abs().max().item()
        a = ours(ids, attention_mask=mask, positions=positions).logits
        b = theirs(ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    diff_masked = (a[valid] - b[valid]).abs().max().item()
    # The padding must change the padded rows' real outputs, or the test masks nothing.
    assert not torch.allclose(ours(ids).logits[1, 4:], a[1, 4:], atol=1e-3), "padding mask had no effect"
    return max(diff_plain, diff_masked)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_ours(case, tmp_path):
    cls_name, kwargs = HF_CASES[case]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = lmforge.load(tmp_path)
    assert type(ours).__name__ == "DecoderLM" and not ours.training
    diff = _compare(ours, hf, *_batch())
    print(f"{case}: max |ours - HF| = {diff:.2e}")
    assert diff <= TOL, f"{case}: logits differ from transformers by {diff:.3e} > {TOL}"


@pytest.mark.parametrize("preset", OUR_PRESETS)
def test_ours_to_hf(preset, tmp_path):
    cfg = lmforge.ModelConfig.from_preset(preset, vocab_size=VOCAB)
    ours = lmforge.build_model(cfg, seed=0).eval()
    _randomize(ours)
    lmforge.save_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.model_type == lmforge.models.hf.infer_model_type(cfg)
    diff = _compare(ours, hf, *_batch())
    print(f"{preset}: max |ours - HF| = {diff:.2e}")
    assert diff <= TOL, f"{preset}: transformers' logits differ from ours by {diff:.3e} > {TOL}"
    # and the round trip back into lmforge gives the identical model
    again = lmforge.load(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} changed in the save/load round trip"


def test_sharded_checkpoint_loads(tmp_path):
    cfg = lmforge.ModelConfig.from_preset("debug-llama", vocab_size=VOCAB)
    ours = lmforge.build_model(cfg, seed=0).eval()
    lmforge.save_hf(ours, tmp_path, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert (lmforge.load(tmp_path)(ids).logits - hf(ids).logits).abs().max() <= TOL


def test_pickle_weights_are_refused_unless_asked(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        lmforge.load(tmp_path)
    ours = lmforge.load(tmp_path, allow_pickle=True)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= TOL


def test_unsupported_and_mismatched_checkpoints_explain_themselves(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "falcon"}')
    with pytest.raises(ValueError, match="model_type 'falcon' is not supported; supported"):
        lmforge.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a .gguf"):
        lmforge.load(tmp_path / "nope")


def test_config_that_hf_cannot_express_is_refused(tmp_path):
    cfg = lmforge.ModelConfig.from_preset("debug-llama", position={"kind": "alibi"})
    with pytest.raises(ValueError, match="cannot be written as Hugging Face 'llama': it uses RoPE"):
        lmforge.save_hf(lmforge.build_model(cfg), tmp_path)
