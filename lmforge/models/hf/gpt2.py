"""GPT-2 <-> Hugging Face `GPT2LMHeadModel` (Conv1D weights stored transposed)."""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.adapter import TO_HF_ACTIVATION, Adapter, activation_from_hf, plain_decoder, require
from lmforge.models.hf.convert import Identity, Rule, Transpose

T = Transpose()


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if d.get(flag, ok) != ok:
            raise ValueError(f"GPT-2 config {flag}={d[flag]} is not supported (only {ok})")
    n_embd = d["n_embd"]
    return ModelConfig(
        arch="decoder", vocab_size=d["vocab_size"], d_model=n_embd, n_layer=d["n_layer"],
        attention=dict(n_head=d["n_head"], qkv_bias=True, out_bias=True),
        position=dict(kind="learned", max_seq_len=d.get("n_positions", 1024)),
        norm=dict(kind="layer", eps=d.get("layer_norm_epsilon", 1e-5), bias=True),
        mlp=dict(d_ff=d.get("n_inner") or 4 * n_embd, gated=False, bias=True,
                 activation=activation_from_hf(d.get("activation_function", "gelu_new"))),
        tie_embeddings=d.get("tie_word_embeddings", True),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        hf_model_type="gpt2",
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a, m = cfg.attention, cfg.mlp
    for condition, what in (
        (cfg.position.kind == "learned", "GPT-2 uses learned positions"),
        (cfg.norm.kind == "layer" and cfg.norm.bias and cfg.norm.placement == "pre",
         "GPT-2 uses pre-LayerNorm with bias"),
        (a.n_kv_head == a.n_head and a.head_dim * a.n_head == cfg.d_model, "GPT-2 has plain multi-head attention"),
        (a.qkv_bias and a.out_bias and m.bias and not m.gated, "GPT-2 has biases everywhere and a plain MLP"),
        (cfg.moe is None and a.sliding_window is None and a.softmax_scale is None, "no MoE / window / custom scale"),
        (plain_decoder(cfg) and cfg.final_norm, "plain embeddings and head"),
    ):
        require(cfg, condition, what, "gpt2")
    return dict(
        vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=a.n_head,
        n_positions=cfg.position.max_seq_len, n_inner=m.d_ff, activation_function=TO_HF_ACTIVATION[m.activation],
        layer_norm_epsilon=cfg.norm.eps, tie_word_embeddings=cfg.tie_embeddings,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=a.dropout,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def rules(cfg: ModelConfig) -> list[Rule]:
    h = "transformer.h.{i}."
    out = [
        Rule("embed.weight", ("transformer.wte.weight",)),
        Rule("positions.table.weight", ("transformer.wpe.weight",)),
        Rule("norm.weight", ("transformer.ln_f.weight",)),
        Rule("norm.bias", ("transformer.ln_f.bias",)),
    ]
    for ours, theirs, op in (
        ("attn_norm", "ln_1", None), ("mlp_norm", "ln_2", None),
        ("attn.qkv", "attn.c_attn", T), ("attn.o", "attn.c_proj", T),
        ("mlp.up", "mlp.c_fc", T), ("mlp.down", "mlp.c_proj", T),
    ):
        out.append(Rule(f"blocks.{{i}}.{ours}.weight", (h + theirs + ".weight",), op or Identity()))
        out.append(Rule(f"blocks.{{i}}.{ours}.bias", (h + theirs + ".bias",)))
    if not cfg.tie_embeddings:
        out.append(Rule("head.proj.weight", ("lm_head.weight",)))
    return out


def canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints of the bare GPT2Model (OpenAI's originals) lack the `transformer.` prefix."""
    return {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in state.items()}


ADAPTER = Adapter(
    model_type="gpt2", architecture="GPT2LMHeadModel", config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    rules=rules, ignore=(".attn.bias", ".attn.masked_bias"), canonical=canonical,
)
