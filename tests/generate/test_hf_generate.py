"""Greedy decoding equals transformers' `generate(do_sample=False)` on the same weights: tiny random HF
models saved with `save_pretrained` and read through the production loader (`lmforge.load`)."""

from __future__ import annotations

import pytest
import torch

import lmforge

transformers = pytest.importorskip("transformers")

VOCAB = 97
NEW = 20
CASES = {
    "llama": ("LlamaConfig", "AutoModelForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "AutoModelForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                          bos_token_id=1, eos_token_id=2)),
    "t5": ("T5Config", "AutoModelForSeq2SeqLM", dict(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)),
    # BART starts decoding from </s> (decoder_start_token_id=2, read from config.json); forced_eos_token_id off
    # so HF does not overwrite the last of the NEW tokens with eos
    "bart": ("BartConfig", "AutoModelForSeq2SeqLM", dict(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
}


def _hf_and_ours(case: str, tmp_path):
    config_cls, auto_cls, kwargs = CASES[case]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(0)
    hf = getattr(transformers, auto_cls).from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than init weights: greedy output that changes from step to step
        for name, p in hf.named_parameters():
            gain = p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if gain else 0.2) + (1.0 if gain else 0.0))
    hf.save_pretrained(tmp_path)
    return hf, lmforge.load(tmp_path)


def _prompts(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (pad id 0) and their mask."""
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_greedy_equals_hf_generate_for_decoders(case, tmp_path):
    hf, ours = _hf_and_ours(case, tmp_path)
    eos = ours.config.eos_token_id
    for lengths in ([7], [7, 3, 11]):
        ids, mask = _prompts(lengths)
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=0,
                             pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:]
        for use_cache in (True, False):
            mine = lmforge.generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, temperature=0.0,
                                    pad_token_id=0, use_cache=use_cache)
            assert torch.equal(mine, theirs), f"{case} prompts {lengths} use_cache={use_cache}:\n" \
                f"lmforge:      {mine.tolist()}\ntransformers: {theirs.tolist()}"
        assert all(len(set(row)) >= 4 for row in theirs.tolist()), f"{case}: trivial output {theirs.tolist()}"


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_repetition_penalty_equals_hf(case, tmp_path):
    """Unpadded prompts: Hugging Face also penalises the pad ids of padded rows, lmforge does not."""
    hf, ours = _hf_and_ours(case, tmp_path)
    ids, _ = _prompts([9])
    theirs = hf.generate(ids, do_sample=False, max_new_tokens=NEW, repetition_penalty=1.5, pad_token_id=0,
                         eos_token_id=ours.config.eos_token_id)[:, ids.shape[1]:]
    mine = lmforge.generate(ours, ids, max_new_tokens=NEW, temperature=0.0, repetition_penalty=1.5)
    assert torch.equal(mine, theirs), f"{case}:\nlmforge:      {mine.tolist()}\ntransformers: {theirs.tolist()}"


@pytest.mark.parametrize("case", ["t5", "bart"])
@pytest.mark.parametrize("penalty", [1.0, 2.0])
def test_greedy_equals_hf_generate_for_encoder_decoders(case, penalty, tmp_path):
    """The tiny T5 repeats one token under plain greedy decoding; a repetition penalty makes the
    comparison cover 20 different tokens (and checks the penalty on the decoder's tokens against HF's).
    Each starts from its own decoder_start_token_id (T5: pad 0, BART: eos 2), which `lmforge.load` reads."""
    hf, ours = _hf_and_ours(case, tmp_path)
    assert ours.config.decoder_start_token_id == hf.config.decoder_start_token_id
    g = torch.Generator().manual_seed(2)
    src = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0  # right padded
    theirs = hf.generate(src, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         repetition_penalty=penalty)[:, 1:]  # drop the start token
    for use_cache in (True, False):
        mine = lmforge.generate(ours, src, attention_mask=mask, max_new_tokens=NEW, temperature=0.0,
                                repetition_penalty=penalty, use_cache=use_cache)
        assert torch.equal(mine, theirs), f"{case} (use_cache={use_cache}):\nlmforge:      {mine.tolist()}\n" \
            f"transformers: {theirs.tolist()}"
    if penalty > 1:
        assert all(len(set(row)) >= 10 for row in theirs.tolist()), f"{case}: trivial output {theirs.tolist()}"
