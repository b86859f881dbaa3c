"""BERT <-> Hugging Face `BertModel`, `BertForMaskedLM`, `BertForSequenceClassification` and
`BertForTokenClassification` (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers").

BERT is a post-LayerNorm encoder with learned absolute positions, segment (token type) embeddings, a
LayerNorm over the summed embeddings, biases everywhere and no final norm. The HF class in
config.json "architectures" picks our head; on save the head picks the class back.

Key layouts: task models prefix the encoder with `bert.`, a `BertModel` saved alone has no prefix.
`canonical` brings a checkpoint to the layout its class saves, which `rules` follows per head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.adapter import TO_HF_ACTIVATION, Adapter, activation_from_hf, require
from lmforge.models.hf.convert import Concat, Identity, Rule

# HF class -> our head
HEADS = {
    "BertModel": "none",
    "BertForMaskedLM": "lm",
    "BertForPreTraining": "lm",  # the original Google checkpoints: masked LM + next-sentence head (dropped)
    "BertForSequenceClassification": "sequence_classification",
    "BertForTokenClassification": "token_classification",
}
CLASSES = {"none": "BertModel", "lm": "BertForMaskedLM", "sequence_classification": "BertForSequenceClassification",
           "token_classification": "BertForTokenClassification"}
HEAD_PREFIXES = ("cls.", "classifier.")


class SharedBias(Identity):
    """The MLM output bias is stored twice: `cls.predictions.bias` and the decoder's own bias. HF ties the
    two, except with tie_word_embeddings=False in transformers 5, where only the decoder's bias is
    applied. Read the decoder's; write both, so either kind of tying loads the same logits."""

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[-1]

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor, tensor.clone()]  # safetensors refuses two names for one storage


def _head(d: dict[str, Any]) -> str:
    arch = (d.get("architectures") or ["BertModel"])[0]  # no architectures: AutoModel builds a BertModel
    if arch not in HEADS:
        raise ValueError(f"BERT architecture {arch!r} is not supported; supported: {sorted(HEADS)}")
    return HEADS[arch]


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    for flag, ok in (("position_embedding_type", "absolute"), ("is_decoder", False), ("add_cross_attention", False)):
        if d.get(flag, ok) != ok:
            raise ValueError(f"BERT config {flag}={d[flag]!r} is not supported (only {ok!r}); "
                             "lmforge reads bidirectional BERT encoders with absolute positions")
    head = _head(d)
    n_labels = d.get("num_labels") or len(d.get("id2label") or {}) or 2
    return ModelConfig(
        arch="encoder", vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layer=d["num_hidden_layers"],
        attention=dict(n_head=d["num_attention_heads"], qkv_bias=True, out_bias=True,
                       dropout=d.get("attention_probs_dropout_prob", 0.1)),
        position=dict(kind="learned", max_seq_len=d.get("max_position_embeddings", 512)),
        norm=dict(kind="layer", eps=d.get("layer_norm_eps", 1e-12), bias=True, placement="post"),
        mlp=dict(d_ff=d["intermediate_size"], activation=activation_from_hf(d.get("hidden_act", "gelu")),
                 gated=False, bias=True),
        type_vocab_size=d.get("type_vocab_size", 2), embed_norm=True, final_norm=False,
        dropout=d.get("hidden_dropout_prob", 0.1),
        head=head, n_labels=n_labels, pooler=head in ("none", "sequence_classification"),
        head_transform=head == "lm", lm_head_bias=head == "lm",
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        pad_token_id=d.get("pad_token_id", 0), hf_model_type="bert",
    )


def refine_config(cfg: ModelConfig, hf_keys: Collection[str]) -> ModelConfig:
    """A `BertModel` may be saved without its pooler (add_pooling_layer=False): follow the checkpoint."""
    if cfg.head != "none":
        return cfg
    return dataclasses.replace(cfg, pooler="pooler.dense.weight" in hf_keys)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a, m, p, n = cfg.attention, cfg.mlp, cfg.position, cfg.norm
    for condition, what in (
        (cfg.arch == "encoder", "BERT is an encoder"),
        (p.kind == "learned" and p.offset == 0, "BERT uses learned positions starting at row 0"),
        (n.kind == "layer" and n.bias and n.placement == "post", "BERT uses post-LayerNorm with bias"),
        (cfg.embed_norm and not cfg.final_norm, "BERT normalises the embeddings and has no final norm"),
        (a.n_kv_head == a.n_head and a.head_dim * a.n_head == cfg.d_model, "BERT has plain multi-head attention"),
        (a.qkv_bias and a.out_bias and m.bias and not m.gated, "BERT has biases everywhere and a plain MLP"),
        (cfg.moe is None and a.sliding_window is None and a.softmax_scale is None, "no MoE / window / custom scale"),
        (cfg.type_vocab_size > 0, "BERT has token type embeddings (type_vocab_size > 0)"),
        (cfg.embed_scale == 1.0 and cfg.head_input_scale == 1.0, "BERT does not scale embeddings or head input"),
        (cfg.head != "lm" or (cfg.head_transform and cfg.lm_head_bias),
         "BERT's masked-LM head has the dense + LayerNorm transform and an output bias"),
        (cfg.head != "sequence_classification" or cfg.pooler, "BERT classifies the pooled [CLS] token"),
    ):
        require(cfg, condition, what, "bert")
    out: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=a.n_head, intermediate_size=m.d_ff, hidden_act=TO_HF_ACTIVATION[m.activation],
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=a.dropout,
        max_position_embeddings=p.max_seq_len, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=n.eps,
        position_embedding_type="absolute", tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0 if cfg.pad_token_id is None else cfg.pad_token_id,
    )
    if cfg.head.endswith("classification"):
        labels = [f"LABEL_{i}" for i in range(cfg.n_labels)]
        out.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    return out


def rules(cfg: ModelConfig) -> list[Rule]:
    d = cfg.d_model
    base = "" if cfg.head == "none" else "bert."
    emb, layer = base + "embeddings.", base + "encoder.layer.{i}."
    att = layer + "attention."
    out = [
        Rule("embed.weight", (emb + "word_embeddings.weight",)),
        Rule("positions.table.weight", (emb + "position_embeddings.weight",)),
        Rule("token_types.weight", (emb + "token_type_embeddings.weight",)),
        Rule("embed_norm.weight", (emb + "LayerNorm.weight",)),
        Rule("embed_norm.bias", (emb + "LayerNorm.bias",)),
    ]
    for part in ("weight", "bias"):
        out += [
            Rule(f"blocks.{{i}}.attn.qkv.{part}", tuple(att + f"self.{p}.{part}" for p in ("query", "key", "value")),
                 Concat((d, d, d))),
            Rule(f"blocks.{{i}}.attn.o.{part}", (att + f"output.dense.{part}",)),
            Rule(f"blocks.{{i}}.attn_norm.{part}", (att + f"output.LayerNorm.{part}",)),
            Rule(f"blocks.{{i}}.mlp.up.{part}", (layer + f"intermediate.dense.{part}",)),
            Rule(f"blocks.{{i}}.mlp.down.{part}", (layer + f"output.dense.{part}",)),
            Rule(f"blocks.{{i}}.mlp_norm.{part}", (layer + f"output.LayerNorm.{part}",)),
        ]
        if cfg.pooler and cfg.head in ("none", "sequence_classification"):
            out.append(Rule(f"head.pooler.dense.{part}", (base + f"pooler.dense.{part}",)))
        if cfg.head.endswith("classification"):
            out.append(Rule(f"head.classifier.{part}", (f"classifier.{part}",)))
        if cfg.head == "lm":
            out += [
                Rule(f"head.transform.dense.{part}", (f"cls.predictions.transform.dense.{part}",)),
                Rule(f"head.transform.norm.{part}", (f"cls.predictions.transform.LayerNorm.{part}",)),
            ]
    if cfg.head == "lm":
        out.append(Rule("head.bias", ("cls.predictions.bias", "cls.predictions.decoder.bias"), SharedBias()))
        if not cfg.tie_embeddings:
            out.append(Rule("head.proj.weight", ("cls.predictions.decoder.weight",)))
    return out


def canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout the checkpoint's class saves: `bert.` before the encoder when a head is present, none
    for a bare `BertModel` (whichever way it was written), and both copies of the MLM bias."""
    task = any(k.startswith(HEAD_PREFIXES) for k in state)
    out = {}
    for key, value in state.items():
        # TF-era checkpoints (the original bert-base .bin files) name LayerNorm parameters gamma / beta
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key if key.startswith(HEAD_PREFIXES) else ("bert." if task else "") + key.removeprefix("bert.")] = value
    bias, decoder_bias = "cls.predictions.bias", "cls.predictions.decoder.bias"
    for have, fill in ((bias, decoder_bias), (decoder_bias, bias)):
        if have in out:
            out.setdefault(fill, out[have])
    return out


ADAPTER = Adapter(
    model_type="bert", architecture=lambda cfg: CLASSES[cfg.head], config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, rules=rules, canonical=canonical, refine_config=refine_config,
    ignore=(
        "embeddings.position_ids", "embeddings.token_type_ids",  # buffers some versions saved
        "cls.predictions.decoder.weight",  # the tied copy of the word embeddings, when a checkpoint keeps it
        # BertForPreTraining checkpoints (google-bert/bert-base-uncased) also hold the pooler and the
        # next-sentence head; the masked-LM head uses neither, as in transformers' BertForMaskedLM
        "pooler.dense.weight", "pooler.dense.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias",
    ),
)
