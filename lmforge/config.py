"""Model configuration: one `ModelConfig` with small sub-configs.

Behaviour lives here, never in a model's name: the model classes read these fields at
construction and pick their building blocks from registries. Derived fields (head_dim,
n_kv_head, padded vocab) are computed and validated once, in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHES = ("decoder", "encoder", "encoder_decoder")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "relative", "none")
ROPE_SCALINGS = ("none", "linear", "llama3")
NORMS = ("layer", "rms")
NORM_PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
ATTN_BACKENDS = ("sdpa", "eager")
HEADS = ("lm", "sequence_classification", "token_classification", "none")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


def _check_positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive number")


@dataclass
class AttentionConfig:
    """Self/cross attention. MHA, GQA and MQA differ only in `n_kv_head`."""

    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_head
    qkv_bias: bool = False
    out_bias: bool = False
    sliding_window: int | None = None  # each query sees this many keys, itself included
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    dropout: float = 0.0
    backend: str = "sdpa"  # "sdpa" (fused kernels; MatmulAttention for short bf16 CPU inputs) or "eager" (reference)


@dataclass
class PositionConfig:
    """How token order enters the model."""

    kind: str = "rope"
    max_seq_len: int = 2048
    offset: int = 0  # learned table rows skipped before position 0 (BART keeps 2)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "linear" (position interpolation) or "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_seq_len: int = 8192  # llama3 only
    sinusoidal_layout: str = "interleaved"  # "interleaved" (Vaswani: sin, cos, sin, ...) or "halves"
    relative_buckets: int = 32  # T5 relative attention bias
    relative_max_distance: int = 128


@dataclass
class NormConfig:
    kind: str = "rms"  # "layer" or "rms"
    eps: float = 1e-5
    bias: bool = False  # LayerNorm only
    placement: str = "pre"  # "pre" (GPT-2, Llama) or "post" (BERT, original Transformer)


@dataclass
class MLPConfig:
    d_ff: int | None = None  # None: 4 * d_model
    activation: str = "silu"
    gated: bool = True  # SwiGLU / GeGLU: down(act(gate(x)) * up(x))
    bias: bool = False


@dataclass
class MoEConfig:
    """Sparse mixture of experts replacing the dense MLP (Shazeer 2017; Switch, Fedus 2021)."""

    n_experts: int = 8
    top_k: int = 2
    normalize_top_k: bool = True  # renormalise the chosen k probabilities to sum to 1 (Mixtral)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    z_loss_coef: float = 0.001  # ST-MoE router z-loss weight


@dataclass
class ModelConfig:
    """Everything needed to build a model; see `lmforge.presets` for named instances."""

    arch: str = "decoder"
    vocab_size: int = 256
    d_model: int = 64
    n_layer: int = 2
    n_decoder_layer: int | None = None  # encoder_decoder only; None: = n_layer
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig | None = None
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    embed_scale: float = 1.0  # multiplies token embeddings; sqrt(d_model) in the original Transformer
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    type_vocab_size: int = 0  # BERT's segment (token type) embeddings; 0 = none
    final_norm: bool = True  # pre-norm stacks end with a norm; post-norm stacks do not
    head: str = "lm"  # "lm" (vocab logits), "sequence_classification", "token_classification", "none" (hidden)
    n_labels: int = 2  # classification heads
    pooler: bool = False  # BERT pooler: dense + tanh over the first token (used by sequence classification)
    head_transform: bool = False  # BERT MLM head: dense + activation + norm before the vocab projection
    head_input_scale: float = 1.0  # T5 with tied embeddings scales the last hidden state by d_model ** -0.5
    dropout: float = 0.0  # residual and embedding dropout
    pad_vocab_multiple: int = 1  # embedding rows rounded up for fast matmuls; logits keep vocab_size
    init_std: float = 0.02
    init_scheme: str = "normal"  # "normal" (GPT-2: N(0, init_std)) or "fan_in" (T5: N(0, 1/sqrt(fan_in)))
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder-decoders: the decoder's first input (BART: eos; None:
    # generate falls back to pad_token_id, the T5 / Marian start)
    hf_model_type: str | None = None  # which Hugging Face family save_hf writes; no effect on the model

    # derived in __post_init__
    padded_vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        for name, cls in (("attention", AttentionConfig), ("position", PositionConfig), ("norm", NormConfig),
                          ("mlp", MLPConfig), ("moe", MoEConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
        a, p, n, m = self.attention, self.position, self.norm, self.mlp
        _check_choice("arch", self.arch, ARCHES)
        _check_choice("position.kind", p.kind, POSITIONS)
        _check_choice("position.rope_scaling", p.rope_scaling, ROPE_SCALINGS)
        _check_choice("position.sinusoidal_layout", p.sinusoidal_layout, ("interleaved", "halves"))
        _check_choice("norm.kind", n.kind, NORMS)
        _check_choice("norm.placement", n.placement, NORM_PLACEMENTS)
        _check_choice("mlp.activation", m.activation, ACTIVATIONS)
        _check_choice("attention.backend", a.backend, ATTN_BACKENDS)
        _check_choice("head", self.head, HEADS)
        _check_choice("init_scheme", self.init_scheme, ("normal", "fan_in"))
        if self.arch != "encoder" and self.head != "lm":
            raise ValueError(f"head={self.head!r} needs arch='encoder' (got arch={self.arch!r}); "
                             "decoders and encoder-decoders end in an 'lm' head")
        if self.head.endswith("classification"):
            _check_positive("n_labels", self.n_labels)
        for name in ("vocab_size", "d_model", "n_layer", "pad_vocab_multiple"):
            _check_positive(name, getattr(self, name))
        _check_positive("attention.n_head", a.n_head)
        _check_positive("position.max_seq_len", p.max_seq_len)
        if p.offset < 0:
            raise ValueError(f"position.offset={p.offset} must be >= 0")

        if a.head_dim is None:
            if self.d_model % a.n_head:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by attention.n_head={a.n_head}; "
                    "pick a divisor or set attention.head_dim explicitly"
                )
            a.head_dim = self.d_model // a.n_head
        if a.n_kv_head is None:
            a.n_kv_head = a.n_head
        _check_positive("attention.n_kv_head", a.n_kv_head)
        if a.n_head % a.n_kv_head:
            raise ValueError(
                f"attention.n_head={a.n_head} must be a multiple of attention.n_kv_head={a.n_kv_head} "
                "(each key/value head serves a whole group of query heads); pick a divisor of n_head"
            )
        _check_positive("attention.sliding_window", a.sliding_window, allow_none=True)
        if not 0.0 <= a.dropout < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1): got dropout={self.dropout}, "
                             f"attention.dropout={a.dropout}")
        if p.kind == "rope":
            if a.head_dim % 2:
                raise ValueError(f"RoPE rotates pairs of channels: head_dim={a.head_dim} must be even")
            if p.rope_scaling != "none":
                _check_positive("position.rope_factor", p.rope_factor)
            if p.rope_scaling == "llama3" and p.rope_high_freq_factor <= p.rope_low_freq_factor:
                raise ValueError(
                    f"position.rope_high_freq_factor={p.rope_high_freq_factor} must exceed "
                    f"rope_low_freq_factor={p.rope_low_freq_factor} for llama3 scaling"
                )
        if p.kind == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if m.d_ff is None:
            m.d_ff = 4 * self.d_model
        _check_positive("mlp.d_ff", m.d_ff)
        if self.moe is not None:
            _check_positive("moe.n_experts", self.moe.n_experts)
            if m.bias:
                raise ValueError("mlp.bias=True is not supported with MoE experts; set mlp.bias=False")
            if not 1 <= self.moe.top_k <= self.moe.n_experts:
                raise ValueError(
                    f"moe.top_k={self.moe.top_k} must lie in [1, moe.n_experts={self.moe.n_experts}]"
                )
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        start = self.decoder_start_token_id
        if start is not None:
            if self.arch != "encoder_decoder":
                raise ValueError(f"decoder_start_token_id={start!r} applies to encoder-decoders only, not "
                                 f"arch={self.arch!r}; drop it (decoders continue the prompt's last token)")
            if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < self.vocab_size:
                raise ValueError(f"decoder_start_token_id={start!r} must be a token id in [0, vocab_size="
                                 f"{self.vocab_size}); BART uses its eos id (2), T5 and Marian their pad id")
        mult = self.pad_vocab_multiple
        self.padded_vocab_size = -(-self.vocab_size // mult) * mult

    # -- construction helpers -------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset with overrides: top-level fields (`n_layer=2`), sub-config dicts that
        merge (`attention={"n_kv_head": 1}`) or dotted keys (`**{"attention.n_kv_head": 1}`)."""
        from lmforge.presets import get_preset

        return cls.from_dict(get_preset(name), **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> ModelConfig:
        merged = _merge(_plain(data), _expand_dotted(overrides))
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(known)}")
        for name, sub in _SUBCONFIGS.items():
            if isinstance(merged.get(name), dict):
                valid = {f.name for f in dataclasses.fields(sub)}
                bad = sorted(set(merged[name]) - valid)
                if bad:
                    raise ValueError(f"unknown {name} field(s) {bad}; valid fields: {sorted(valid)}")
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("padded_vocab_size")
        return d

    def summary(self) -> str:
        a, p = self.attention, self.position
        ffn = f"MoE {self.moe.n_experts} experts top-{self.moe.top_k}" if self.moe else "dense"
        lines = [
            f"arch={self.arch}  layers={self.n_layer}  d_model={self.d_model}  vocab={self.vocab_size}",
            f"attention: heads={a.n_head} kv_heads={a.n_kv_head} head_dim={a.head_dim} "
            f"window={a.sliding_window} backend={a.backend}",
            f"position={p.kind}" + (f" theta={p.rope_theta} scaling={p.rope_scaling}" if p.kind == "rope" else ""),
            f"norm={self.norm.kind} ({self.norm.placement})  mlp={self.mlp.activation} "
            f"gated={self.mlp.gated} d_ff={self.mlp.d_ff}  ffn={ffn}  tied={self.tie_embeddings}",
        ]
        return "\n".join(lines)


_SUBCONFIGS = {"attention": AttentionConfig, "position": PositionConfig, "norm": NormConfig,
               "mlp": MLPConfig, "moe": MoEConfig}


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in data.items()}


def _expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if "." in key:
            head, tail = key.split(".", 1)
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        elif isinstance(value, dict) and key == "moe" and out.get(key) is None:
            out[key] = dict(value)
        else:
            out[key] = value
    return out

