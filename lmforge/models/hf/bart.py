"""BART and Marian <-> Hugging Face `BartForConditionalGeneration` and `MarianMTModel`.

Both are the original encoder-decoder (Vaswani et al. 2017): post-LayerNorm blocks with biases everywhere,
one token embedding shared by encoder, decoder and LM head, plus a logits bias (`final_logits_bias`, a
buffer in transformers). They differ only in how positions enter:
  BART (Lewis et al. 2019, arXiv:1910.13461): a learned table whose row 0 sits at index 2 (fairseq keeps
    two rows for padding), then a LayerNorm over the embeddings (`layernorm_embedding`).
  Marian (Junczys-Dowmunt et al. 2018, the OPUS-MT models): fixed sinusoids with all sines before all
    cosines, no embedding norm; embeddings scaled by sqrt(d_model) (`scale_embedding`).
Pre-norm variants (mBART, `normalize_before`) are separate transformers classes and are refused here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.adapter import TO_HF_ACTIVATION, Adapter, activation_from_hf, require
from lmforge.models.hf.convert import Concat, Identity, Rule
from lmforge.nn.positions import sinusoidal_table

# model_type -> (HF class, HF classes whose checkpoints hold the same weights)
FAMILIES = {
    "bart": ("BartForConditionalGeneration", ("BartForConditionalGeneration", "BartModel")),
    "marian": ("MarianMTModel", ("MarianMTModel", "MarianModel")),
}
# Flags of older BART configs that transformers 5 no longer reads: it runs every BART as below.
BART_FIXED = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": True,
              "static_position_embeddings": False, "add_bias_logits": False, "extra_pos_embeddings": 2}
HF_LAYER_NORM_EPS = 1e-5  # transformers builds these LayerNorms with torch's default eps
SHARED = "model.shared.weight"
EMBED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
SINUSOID_TOL = 1e-5  # both tables are computed in fp64 and stored in fp32


class RowVector(Identity):
    """`final_logits_bias` is a (1, V) buffer; our head bias is (V,)."""

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0].reshape(-1)

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.reshape(1, -1)]


class Copies(Identity):
    """One of our tensors written to several HF keys: with an untied LM head, transformers 5 does not tie
    the encoder and decoder token embeddings to `model.shared` either, so each needs its own copy.
    (`canonical` has already checked that the copies agree.)"""

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.clone() for _ in range(1 + len(EMBED_COPIES))]  # clones: safetensors refuses aliases


def _check_hf_config(d: dict[str, Any], model_type: str) -> None:
    arch = (d.get("architectures") or [FAMILIES[model_type][0]])[0]
    if arch not in FAMILIES[model_type][1]:
        raise ValueError(f"{model_type} checkpoint of class {arch!r} is not supported; lmforge loads "
                         f"{list(FAMILIES[model_type][1])} as a sequence-to-sequence LM")
    for ours, theirs in (("encoder_attention_heads", "decoder_attention_heads"),
                         ("encoder_ffn_dim", "decoder_ffn_dim")):
        if d[ours] != d[theirs]:
            raise ValueError(f"{ours}={d[ours]} differs from {theirs}={d[theirs]}; lmforge's encoder and "
                             "decoder share one attention and MLP shape, so both must be equal")
    if model_type == "bart":
        for flag, ok in BART_FIXED.items():
            if d.get(flag, ok) != ok:
                raise ValueError(f"BART config {flag}={d[flag]!r} is not supported (only {ok!r}, the only BART "
                                 "transformers 5 implements); pre-norm variants such as mBART are other families")
    if model_type == "marian":
        if not d.get("share_encoder_decoder_embeddings", True) or d.get("decoder_vocab_size") not in (
                None, d["vocab_size"]):
            raise ValueError("Marian with share_encoder_decoder_embeddings=False (separate target vocabulary "
                             f"{d.get('decoder_vocab_size')}) is not supported; lmforge shares one embedding "
                             "matrix between encoder, decoder and head")


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    model_type = d["model_type"]
    _check_hf_config(d, model_type)
    d_model = d["d_model"]
    max_len = d.get("max_position_embeddings", 1024)
    if model_type == "bart":
        position = dict(kind="learned", max_seq_len=max_len, offset=2)
    else:
        position = dict(kind="sinusoidal", max_seq_len=max_len, sinusoidal_layout="halves")
    return ModelConfig(
        arch="encoder_decoder", vocab_size=d["vocab_size"], d_model=d_model, n_layer=d["encoder_layers"],
        n_decoder_layer=d["decoder_layers"],
        attention=dict(n_head=d["encoder_attention_heads"], qkv_bias=True, out_bias=True,
                       dropout=d.get("attention_dropout", 0.0)),
        position=position,
        norm=dict(kind="layer", eps=HF_LAYER_NORM_EPS, bias=True, placement="post"),
        mlp=dict(d_ff=d["encoder_ffn_dim"], activation=activation_from_hf(d.get("activation_function", "gelu")),
                 gated=False, bias=True),
        tie_embeddings=d.get("tie_word_embeddings", True), lm_head_bias=True,
        embed_scale=math.sqrt(d_model) if d.get("scale_embedding", False) else 1.0,
        embed_norm=model_type == "bart", final_norm=False, dropout=d.get("dropout", 0.0),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        decoder_start_token_id=d.get("decoder_start_token_id"), hf_model_type=model_type,
    )


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    a, m, n, p = cfg.attention, cfg.mlp, cfg.norm, cfg.position
    bart = model_type == "bart"
    scaled = math.isclose(cfg.embed_scale, math.sqrt(cfg.d_model), rel_tol=1e-9)
    for condition, what in (
        (cfg.arch == "encoder_decoder" and cfg.head == "lm", "it is an encoder-decoder with an LM head"),
        (p.kind == "learned" and p.offset == 2 if bart else p.kind == "sinusoidal" and p.sinusoidal_layout == "halves",
         "BART uses learned positions with position.offset=2" if bart else
         "Marian uses sinusoidal positions with all sines first: position.sinusoidal_layout='halves' "
         f"(got kind={p.kind!r}, layout={p.sinusoidal_layout!r})"),
        (cfg.embed_norm == bart, "BART has a LayerNorm after the embeddings (embed_norm=True); Marian has none"),
        (n.kind == "layer" and n.bias and n.placement == "post" and not cfg.final_norm,
         "it uses post-LayerNorm with bias and no final norm"),
        (n.eps == HF_LAYER_NORM_EPS, f"its LayerNorms have eps={HF_LAYER_NORM_EPS} (got norm.eps={n.eps})"),
        (a.n_kv_head == a.n_head and a.head_dim * a.n_head == cfg.d_model and a.qkv_bias and a.out_bias
         and a.softmax_scale is None and a.sliding_window is None, "it has plain multi-head attention with biases"),
        (not m.gated and m.bias and cfg.moe is None, "it has a plain (ungated, biased, dense) MLP"),
        (cfg.embed_scale == 1.0 or scaled, f"embeddings are scaled by 1 or sqrt(d_model) (got {cfg.embed_scale})"),
        (not (cfg.type_vocab_size or cfg.head_transform or cfg.pooler) and cfg.head_input_scale == 1.0,
         "plain embeddings and head"),
    ):
        require(cfg, condition, what, model_type)
    out = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.n_layer,
        decoder_layers=cfg.n_decoder_layer, encoder_attention_heads=a.n_head, decoder_attention_heads=a.n_head,
        encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function=TO_HF_ACTIVATION[m.activation],
        max_position_embeddings=p.max_seq_len, scale_embedding=scaled, tie_word_embeddings=cfg.tie_embeddings,
        dropout=cfg.dropout, attention_dropout=a.dropout, activation_dropout=0.0, is_encoder_decoder=True,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        forced_eos_token_id=cfg.eos_token_id,
    )
    # Generation starts from </s> in BART, from <pad> in Marian (their conversion scripts) unless the config
    # names its start. transformers requires an int here: without one, config.json leaves its default and
    # generate() needs it passed.
    start = cfg.decoder_start_token_id
    if start is None:
        start = cfg.eos_token_id if bart else cfg.pad_token_id
    if isinstance(start, int):
        out["decoder_start_token_id"] = start
    if not bart:
        out.update(share_encoder_decoder_embeddings=True, decoder_vocab_size=cfg.vocab_size)
    return out


def rules(cfg: ModelConfig) -> list[Rule]:
    d = cfg.attention.n_head * cfg.attention.head_dim
    if cfg.tie_embeddings:
        out = [Rule("embed.weight", (SHARED,))]
    else:
        out = [Rule("embed.weight", (SHARED, *EMBED_COPIES), Copies()), Rule("head.proj.weight", ("lm_head.weight",))]
    if cfg.lm_head_bias:
        out.append(Rule("head.bias", ("final_logits_bias",), RowVector()))
    for stack, i in (("encoder", "{i}"), ("decoder", "{j}")):
        hf = f"model.{stack}."
        if cfg.position.kind == "learned":
            out.append(Rule(f"{stack}.positions.table.weight", (hf + "embed_positions.weight",)))
        if cfg.embed_norm:
            out += [Rule(f"{stack}.embed_norm.{w}", (hf + f"layernorm_embedding.{w}",)) for w in ("weight", "bias")]
        ours, theirs = f"{stack}.blocks.{i}.", f"{hf}layers.{i}."
        pairs = [("attn.o", "self_attn.out_proj"), ("attn_norm", "self_attn_layer_norm"), ("mlp.up", "fc1"),
                 ("mlp.down", "fc2"), ("mlp_norm", "final_layer_norm")]
        if stack == "decoder":
            pairs += [("cross_attn.q", "encoder_attn.q_proj"), ("cross_attn.o", "encoder_attn.out_proj"),
                      ("cross_norm", "encoder_attn_layer_norm")]
        for w in ("weight", "bias"):
            out += [Rule(f"{ours}{a}.{w}", (f"{theirs}{b}.{w}",)) for a, b in pairs]
            out.append(Rule(f"{ours}attn.qkv.{w}", tuple(f"{theirs}self_attn.{x}_proj.{w}" for x in "qkv"),
                            Concat((d, d, d))))
            if stack == "decoder":
                out.append(Rule(f"{ours}cross_attn.kv.{w}", tuple(f"{theirs}encoder_attn.{x}_proj.{w}" for x in "kv"),
                                Concat((d, d))))
    return out


def _canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare BartModel/MarianModel checkpoint lacks the `model.` prefix (and the logits bias: see
    `refine_config`). The per-stack token embeddings are tied copies of `model.shared`: check they agree, and
    fill in missing ones so untied-head configs (which write all three) find them."""
    state = {k if k.startswith(("model.", "lm_head.", "final_logits_bias")) else "model." + k: v
             for k, v in state.items()}
    if SHARED not in state:
        present = [k for k in EMBED_COPIES if k in state]
        if not present:
            raise ValueError(f"checkpoint has no token embedding ({SHARED} or {list(EMBED_COPIES)})")
        state[SHARED] = state[present[0]]
    for key in EMBED_COPIES:
        state.setdefault(key, state[SHARED])
        if not torch.equal(state[key], state[SHARED]):
            raise ValueError(f"checkpoint's {key} differs from {SHARED}: separate encoder/decoder token embeddings "
                             "are not supported (lmforge shares one matrix between encoder, decoder and head)")
    return state


def _canonical_marian(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Marian's `embed_positions` are a fixed sinusoid table (transformers neither saves nor reads them);
    older checkpoints still hold them: check they are the 'halves' layout we compute, then drop them."""
    state = _canonical(state)
    for stack in ("encoder", "decoder"):
        table = state.pop(f"model.{stack}.embed_positions.weight", None)
        if table is None:
            continue
        ours = sinusoidal_table(torch.arange(table.shape[0]), table.shape[1], "halves")
        diff = (table.float() - ours).abs().max().item()
        if diff > SINUSOID_TOL:
            raise ValueError(f"checkpoint's model.{stack}.embed_positions.weight differs from Marian's sinusoid "
                             f"table (sines first, then cosines) by {diff:.2e} > {SINUSOID_TOL}; these positions "
                             "are not Marian's fixed sinusoids")
    return state


def refine_config(cfg: ModelConfig, hf_keys: Collection[str]) -> ModelConfig:
    """No `final_logits_bias` (a bare BartModel, or our save of a model without one): transformers zeros it."""
    return cfg if "final_logits_bias" in hf_keys else dataclasses.replace(cfg, lm_head_bias=False)


def _adapter(model_type: str) -> Adapter:
    return Adapter(
        model_type=model_type, architecture=FAMILIES[model_type][0], config_from_hf=config_from_hf,
        config_to_hf=lambda cfg: config_to_hf(cfg, model_type), rules=rules,
        ignore=("embed_tokens.weight", "encoder.version", "decoder.version"),
        canonical=_canonical_marian if model_type == "marian" else _canonical, refine_config=refine_config,
    )


ADAPTERS = {name: _adapter(name) for name in FAMILIES}
