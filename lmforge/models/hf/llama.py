"""The Llama family <-> Hugging Face: Llama, Mistral (sliding window), Qwen2 (q/k/v biases) and
Mixtral (MoE). They share one layout and differ in a few config fields, listed per family below."""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.models.hf.adapter import TO_HF_ACTIVATION, Adapter, activation_from_hf, plain_decoder, require
from lmforge.models.hf.convert import Concat, Rule, Stack

# model_type -> (HF class, how q/k/v and o biases are set, has sliding window, is MoE)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "attention_bias", False, False),
    "mistral": ("MistralForCausalLM", "none", True, False),
    "qwen2": ("Qwen2ForCausalLM", "qkv", True, False),
    "mixtral": ("MixtralForCausalLM", "none", True, True),
}


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """Transformers 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`."""
    rope = dict(d.get("rope_parameters") or {})
    if not rope:
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = dict(kind="rope", max_seq_len=d.get("max_position_embeddings", 2048),
                               rope_theta=float(rope.get("rope_theta", 10000.0)))
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported; supported: default, linear, llama3")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    p = cfg.position
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": p.rope_theta}
    if p.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=p.rope_factor)
    elif p.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=p.rope_factor, low_freq_factor=p.rope_low_freq_factor,
                    high_freq_factor=p.rope_high_freq_factor,
                    original_max_position_embeddings=p.rope_original_max_seq_len)
    return rope


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    model_type = d["model_type"]
    _, bias_rule, has_window, is_moe = FAMILIES[model_type]
    n_head = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // n_head
    qkv_bias = out_bias = False
    if bias_rule == "attention_bias":
        qkv_bias = out_bias = bool(d.get("attention_bias", False))
    elif bias_rule == "qkv":
        qkv_bias = True
    window = d.get("sliding_window") if has_window else None
    if model_type == "qwen2":
        if d.get("use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=True (windows on some layers only) is not supported")
        window = None
    moe = None
    if is_moe:
        moe = dict(n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"], normalize_top_k=True,
                   aux_loss_coef=d.get("router_aux_loss_coef", 0.02), z_loss_coef=0.0)
    return ModelConfig(
        arch="decoder", vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layer=d["num_hidden_layers"],
        attention=dict(n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, head_dim=head_dim,
                       qkv_bias=qkv_bias, out_bias=out_bias, sliding_window=window,
                       dropout=d.get("attention_dropout", 0.0)),
        position=_rope_from_hf(d),
        norm=dict(kind="rms", eps=d.get("rms_norm_eps", 1e-6)),
        mlp=dict(d_ff=d["intermediate_size"], activation=activation_from_hf(d.get("hidden_act", "silu")),
                 gated=True, bias=bool(d.get("mlp_bias", False))),
        moe=moe, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        hf_model_type=model_type,
    )


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    _, bias_rule, has_window, is_moe = FAMILIES[model_type]
    a, m = cfg.attention, cfg.mlp
    bias_ok = {"attention_bias": a.qkv_bias == a.out_bias, "none": not (a.qkv_bias or a.out_bias),
               "qkv": a.qkv_bias and not a.out_bias}[bias_rule]
    for condition, what in (
        (cfg.position.kind == "rope", "it uses RoPE"),
        (cfg.norm.kind == "rms" and cfg.norm.placement == "pre" and cfg.final_norm, "it uses pre-RMSNorm"),
        (m.gated and (not m.bias or model_type == "llama"), "it uses a gated MLP without biases"),
        (bias_ok, f"its attention biases follow the rule {bias_rule!r}"),
        (has_window or a.sliding_window is None, "it has no sliding window"),
        (is_moe == (cfg.moe is not None), "MoE is Mixtral's alone"),
        (cfg.moe is None or cfg.moe.normalize_top_k, "Mixtral renormalises its top-k weights"),
        (plain_decoder(cfg) and a.softmax_scale is None, "plain embeddings and head"),
    ):
        require(cfg, condition, what, model_type)
    out: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=a.n_head, num_key_value_heads=a.n_kv_head, head_dim=a.head_dim,
        intermediate_size=m.d_ff, hidden_act=TO_HF_ACTIVATION[m.activation], rms_norm_eps=cfg.norm.eps,
        max_position_embeddings=cfg.position.max_seq_len, rope_parameters=_rope_to_hf(cfg),
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=a.dropout,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    if bias_rule == "attention_bias":
        out.update(attention_bias=a.qkv_bias, mlp_bias=m.bias)
    if has_window:
        out["sliding_window"] = a.sliding_window
    if model_type == "qwen2":
        out.update(use_sliding_window=False, max_window_layers=cfg.n_layer)
    if cfg.moe is not None:
        out.update(num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                   router_aux_loss_coef=cfg.moe.aux_loss_coef)
    return out


def rules(cfg: ModelConfig) -> list[Rule]:
    a = cfg.attention
    q, kv = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    layer = "model.layers.{i}."
    attn = layer + "self_attn."
    out = [
        Rule("embed.weight", ("model.embed_tokens.weight",)),
        Rule("norm.weight", ("model.norm.weight",)),
        Rule("blocks.{i}.attn_norm.weight", (layer + "input_layernorm.weight",)),
        Rule("blocks.{i}.mlp_norm.weight", (layer + "post_attention_layernorm.weight",)),
        Rule("blocks.{i}.attn.qkv.weight", tuple(attn + f"{p}_proj.weight" for p in "qkv"), Concat((q, kv, kv))),
        Rule("blocks.{i}.attn.o.weight", (attn + "o_proj.weight",)),
    ]
    if a.qkv_bias:
        out.append(Rule("blocks.{i}.attn.qkv.bias", tuple(attn + f"{p}_proj.bias" for p in "qkv"), Concat((q, kv, kv))))
    if a.out_bias:
        out.append(Rule("blocks.{i}.attn.o.bias", (attn + "o_proj.bias",)))
    if cfg.moe is not None:
        moe = layer + "block_sparse_moe."
        out += [
            Rule("blocks.{i}.mlp.router.weight", (moe + "gate.weight",)),
            Rule("blocks.{i}.mlp.w_gate", (moe + "experts.{e}.w1.weight",), Stack()),
            Rule("blocks.{i}.mlp.w_down", (moe + "experts.{e}.w2.weight",), Stack()),
            Rule("blocks.{i}.mlp.w_up", (moe + "experts.{e}.w3.weight",), Stack()),
        ]
    else:
        for name in ("gate", "up", "down"):
            out.append(Rule(f"blocks.{{i}}.mlp.{name}.weight", (layer + f"mlp.{name}_proj.weight",)))
            if cfg.mlp.bias:
                out.append(Rule(f"blocks.{{i}}.mlp.{name}.bias", (layer + f"mlp.{name}_proj.bias",)))
    if not cfg.tie_embeddings:
        out.append(Rule("head.proj.weight", ("lm_head.weight",)))
    return out


def _adapter(model_type: str) -> Adapter:
    return Adapter(
        model_type=model_type, architecture=FAMILIES[model_type][0], config_from_hf=config_from_hf,
        config_to_hf=lambda cfg: config_to_hf(cfg, model_type), rules=rules, ignore=("rotary_emb.inv_freq",),
    )


ADAPTERS = {name: _adapter(name) for name in FAMILIES}
