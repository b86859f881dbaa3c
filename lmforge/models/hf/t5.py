"""T5 <-> Hugging Face `T5ForConditionalGeneration` and `T5EncoderModel` (Raffel et al. 2020, "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer"; transformers `models/t5/modeling_t5.py`).

T5 is pre-RMSNorm with no biases anywhere, unscaled attention (the 1/sqrt(d) lives in the init) with
head_dim = d_kv, and a learned relative position bias per stack, stored on the first block's self-attention.
v1.0: ReLU FFN, head tied to `shared` with the decoder output scaled by d_model^-0.5. v1.1 (and Flan-T5):
gated-GELU (tanh form, "gelu_new"), untied `lm_head`, no scaling.

Tying follows transformers 5: `T5Config` forces `tie_word_embeddings=True` and keeps the v1.0/v1.1 choice
in `scale_decoder_outputs` (derived from the `tie_word_embeddings` of config.json unless written itself);
`lm_head` stays tied to `shared` unless the checkpoint holds a different `lm_head.weight`. So the head is
tied iff no distinct `lm_head.weight` is stored (`canonical` + `refine_config`), and scaled iff the config
says so. `save_hf` writes both keys, which transformers 4 (scaling and tying iff `tie_word_embeddings`) reads
the same way for v1.0 and v1.1 heads.

Where we depart from HF, in training only: HF applies `dropout_rate` also to attention probabilities and
between the FFN's activation and `wo`; ours uses `attention.dropout` and has no inner FFN dropout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.adapter import TO_HF_ACTIVATION, Adapter, activation_from_hf, require
from lmforge.models.hf.convert import Concat, Rule

CLASSES = {"T5ForConditionalGeneration": "encoder_decoder", "T5EncoderModel": "encoder"}
GATED_ACTIVATIONS = {"gelu_tanh": "gated-gelu", "silu": "gated-silu", "relu": "gated-relu"}


def _arch(d: dict[str, Any]) -> str:
    names = d.get("architectures") or ["T5ForConditionalGeneration"]
    if names[0] not in CLASSES:
        raise ValueError(f"T5 architecture {names[0]!r} is not supported; supported: {sorted(CLASSES)} "
                         "(load the checkpoint's weights into one of those classes first)")
    return CLASSES[names[0]]


def _feed_forward(proj: str) -> dict[str, Any]:
    """`feed_forward_proj` is "{act}" or "gated-{act}"; "gated-gelu" means gelu_new (T5Config, for v1.1)."""
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj={proj!r} must be 'ACT' or 'gated-ACT', e.g. 'relu' or 'gated-gelu'")
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return dict(gated=len(parts) == 2, activation=activation_from_hf(name), bias=False)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    arch = _arch(d)
    d_model, n_head = d["d_model"], d["num_heads"]
    # v1.0 scales the decoder output before its head, v1.1 does not (see the module docstring)
    scaled = d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True) is not False)
    return ModelConfig(
        arch=arch, head="lm" if arch == "encoder_decoder" else "none", vocab_size=d["vocab_size"], d_model=d_model,
        n_layer=d["num_layers"], n_decoder_layer=d.get("num_decoder_layers") or d["num_layers"],
        attention=dict(n_head=n_head, head_dim=d.get("d_kv", d_model // n_head), softmax_scale=1.0,
                       dropout=d.get("dropout_rate", 0.0)),
        position=dict(kind="relative", max_seq_len=d.get("n_positions", 512),
                      relative_buckets=d.get("relative_attention_num_buckets", 32),
                      relative_max_distance=d.get("relative_attention_max_distance", 128)),
        norm=dict(kind="rms", eps=d.get("layer_norm_epsilon", 1e-6)),
        mlp=dict(d_ff=d["d_ff"], **_feed_forward(d.get("feed_forward_proj", "relu"))),
        tie_embeddings=True, head_input_scale=d_model**-0.5 if scaled and arch == "encoder_decoder" else 1.0,
        dropout=d.get("dropout_rate", 0.0), init_scheme="fan_in",
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id", 1),
        pad_token_id=d.get("pad_token_id", 0), hf_model_type="t5",
        decoder_start_token_id=d.get("decoder_start_token_id") if arch == "encoder_decoder" else None,
    )


def _scaled(cfg: ModelConfig) -> bool:
    return cfg.arch == "encoder_decoder" and math.isclose(cfg.head_input_scale, cfg.d_model**-0.5)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a, m = cfg.attention, cfg.mlp
    head_ok = (cfg.arch == "encoder_decoder" and cfg.head == "lm") or (cfg.arch == "encoder" and cfg.head == "none")
    for condition, what in (
        (head_ok, "T5 is an encoder-decoder LM (T5ForConditionalGeneration) or a bare encoder (T5EncoderModel)"),
        (cfg.position.kind == "relative", "T5 uses relative position buckets"),
        (cfg.norm.kind == "rms" and cfg.norm.placement == "pre" and cfg.final_norm, "T5 uses pre-RMSNorm"),
        (not (a.qkv_bias or a.out_bias or m.bias or cfg.lm_head_bias), "T5 has no biases"),
        (a.n_kv_head == a.n_head and a.softmax_scale == 1.0 and a.sliding_window is None,
         "T5 has unscaled multi-head attention without a window"),
        (not m.gated or m.activation in GATED_ACTIVATIONS, f"gated T5 FFNs use one of {sorted(GATED_ACTIVATIONS)}"),
        (cfg.moe is None, "T5 has dense FFNs"),
        (cfg.embed_scale == 1.0 and not cfg.embed_norm and not cfg.type_vocab_size,
         "T5 feeds plain token embeddings"),
        (not (cfg.head_transform or cfg.pooler), "T5 has no MLM transform or pooler"),
        (cfg.head_input_scale == 1.0 or (_scaled(cfg) and cfg.tie_embeddings),
         "T5 scales the decoder output (by d_model**-0.5) only before a tied head"),
    ):
        require(cfg, condition, what, "t5")
    scaled = _scaled(cfg)
    pad = cfg.pad_token_id
    start = cfg.decoder_start_token_id
    if start is None:  # T5 starts decoding from <pad>
        start = 0 if pad is None else pad
    return dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=a.head_dim, d_ff=m.d_ff, num_layers=cfg.n_layer,
        num_decoder_layers=cfg.n_decoder_layer, num_heads=a.n_head,
        relative_attention_num_buckets=cfg.position.relative_buckets,
        relative_attention_max_distance=cfg.position.relative_max_distance,
        feed_forward_proj=GATED_ACTIVATIONS[m.activation] if m.gated else TO_HF_ACTIVATION[m.activation],
        layer_norm_epsilon=cfg.norm.eps, dropout_rate=cfg.dropout,
        # transformers 4 scales iff tie_word_embeddings (and then ties); a tied unscaled head (what transformers 5
        # builds for tie_word_embeddings=False) is told to it as untied, so it warns that lm_head is missing
        tie_word_embeddings=scaled or cfg.arch == "encoder", scale_decoder_outputs=scaled,
        is_encoder_decoder=cfg.arch == "encoder_decoder", use_cache=cfg.arch == "encoder_decoder",
        decoder_start_token_id=start, pad_token_id=pad, eos_token_id=cfg.eos_token_id,
        bos_token_id=cfg.bos_token_id,
    )


def _stack(ours: str, hf: str, cfg: ModelConfig, decoder: bool) -> list[Rule]:
    """One T5Stack: `ours`/`hf` are the two prefixes ("encoder." / "encoder.", "" / "encoder.", ...)."""
    i = "{j}" if decoder else "{i}"
    a = cfg.attention
    inner = a.n_head * a.head_dim
    blk, layer = f"{ours}blocks.{i}.", f"{hf}block.{i}.layer."
    ffn = layer + ("2" if decoder else "1") + ".DenseReluDense."
    out = [
        Rule(ours + "positions.bias.weight", (hf + "block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
        Rule(ours + "norm.weight", (hf + "final_layer_norm.weight",)),
        Rule(blk + "attn_norm.weight", (layer + "0.layer_norm.weight",)),
        Rule(blk + "attn.qkv.weight", tuple(f"{layer}0.SelfAttention.{p}.weight" for p in "qkv"),
             Concat((inner, inner, inner))),
        Rule(blk + "attn.o.weight", (layer + "0.SelfAttention.o.weight",)),
        Rule(blk + "mlp_norm.weight", (layer + ("2" if decoder else "1") + ".layer_norm.weight",)),
        Rule(blk + "mlp.down.weight", (ffn + "wo.weight",)),
    ]
    if cfg.mlp.gated:
        out += [Rule(blk + "mlp.gate.weight", (ffn + "wi_0.weight",)),
                Rule(blk + "mlp.up.weight", (ffn + "wi_1.weight",))]
    else:
        out.append(Rule(blk + "mlp.up.weight", (ffn + "wi.weight",)))
    if decoder:
        cross = layer + "1.EncDecAttention."
        out += [
            Rule(blk + "cross_norm.weight", (layer + "1.layer_norm.weight",)),
            Rule(blk + "cross_attn.q.weight", (cross + "q.weight",)),
            Rule(blk + "cross_attn.kv.weight", (cross + "k.weight", cross + "v.weight"), Concat((inner, inner))),
            Rule(blk + "cross_attn.o.weight", (cross + "o.weight",)),
        ]
    return out


def rules(cfg: ModelConfig) -> list[Rule]:
    if cfg.arch == "encoder":
        return [Rule("embed.weight", ("shared.weight",)), *_stack("", "encoder.", cfg, decoder=False)]
    out = [Rule("embed.weight", ("shared.weight",))]
    out += _stack("encoder.", "encoder.", cfg, decoder=False) + _stack("decoder.", "decoder.", cfg, decoder=True)
    if not cfg.tie_embeddings:
        out.append(Rule("head.proj.weight", ("lm_head.weight",)))
    return out


def canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`shared` may be stored only as a stack's `embed_tokens` copy, and a tied head as an equal `lm_head`."""
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    if head is not None and shared is not None and head.shape == shared.shape and torch.equal(head, shared):
        del state["lm_head.weight"]
    return state


def refine_config(cfg: ModelConfig, hf_keys: Collection[str]) -> ModelConfig:
    """As transformers does: the head is `shared` unless the checkpoint holds a different `lm_head`."""
    if cfg.arch != "encoder_decoder":
        return cfg
    return dataclasses.replace(cfg, tie_embeddings="lm_head.weight" not in hf_keys)


def architecture(cfg: ModelConfig) -> str:
    return "T5EncoderModel" if cfg.arch == "encoder" else "T5ForConditionalGeneration"


ADAPTER = Adapter(
    model_type="t5", architecture=architecture, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    rules=rules, canonical=canonical, refine_config=refine_config,
    # stacks' copies of `shared`; old checkpoints also carry an unused cross-attention bias (HF skips it too)
    ignore=("embed_tokens.weight", "EncDecAttention.relative_attention_bias.weight"),
)
