"""Encoder-decoder presets: T5 v1.0 and v1.1, the original Transformer, and debug sizes."""

from __future__ import annotations

from typing import Any


def _t5(d_model: int, n_layer: int, n_decoder_layer: int, n_head: int, d_ff: int, v11: bool,
        **kw: Any) -> dict[str, Any]:
    """T5 (Raffel et al. 2020): pre-RMSNorm (eps 1e-6), no biases, unscaled attention with relative
    position buckets (32, max distance 128), head_dim 64. v1.0: ReLU, head tied to the embedding with
    the last hidden state scaled by d_model^-0.5. v1.1: gated-GELU (tanh form), untied head."""
    return dict(
        arch="encoder_decoder", vocab_size=32128, d_model=d_model, n_layer=n_layer, n_decoder_layer=n_decoder_layer,
        attention=dict(n_head=n_head, head_dim=64, softmax_scale=1.0),
        position=dict(kind="relative", max_seq_len=512, relative_buckets=32, relative_max_distance=128),
        norm=dict(kind="rms", eps=1e-6),
        mlp=dict(d_ff=d_ff, activation="gelu_tanh" if v11 else "relu", gated=v11, bias=False),
        tie_embeddings=not v11, head_input_scale=1.0 if v11 else d_model**-0.5, dropout=0.1,
        pad_token_id=0, eos_token_id=1, hf_model_type="t5", init_scheme="fan_in",
    ) | kw


def _transformer(d_model: int, n_layer: int, n_head: int, d_ff: int, vocab_size: int, **kw: Any) -> dict[str, Any]:
    """Vaswani et al. 2017: post-LayerNorm, sinusoidal positions (§3.5), ReLU FFN (eq. 2), one
    embedding matrix shared by source, target and the pre-softmax projection, scaled by sqrt(d_model)
    (§3.4), dropout 0.1 on sub-layer outputs and embedding sums (§5.4)."""
    return dict(
        arch="encoder_decoder", vocab_size=vocab_size, d_model=d_model, n_layer=n_layer,
        attention=dict(n_head=n_head, qkv_bias=True, out_bias=True),
        position=dict(kind="sinusoidal", max_seq_len=1024),
        norm=dict(kind="layer", eps=1e-6, bias=True, placement="post"),
        mlp=dict(d_ff=d_ff, activation="relu", gated=False, bias=True),
        tie_embeddings=True, embed_scale=d_model**0.5, final_norm=False, dropout=0.1,
    ) | kw


PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": _t5(512, 6, 6, 8, 2048, v11=False),  # google-t5/t5-small config.json
    "t5-v1.1-small": _t5(512, 8, 8, 6, 1024, v11=True),  # google/t5-v1_1-small config.json
    # Vaswani et al. 2017, Table 3 "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1; 37000 shared BPE tokens (En-De)
    "transformer-base": _transformer(512, 6, 8, 2048, 37000),
    "debug-t5": _t5(64, 2, 2, 4, 128, v11=False, vocab_size=256,
                    attention=dict(n_head=4, head_dim=16, softmax_scale=1.0)),
    "debug-t5-v1.1": _t5(64, 2, 3, 4, 96, v11=True, vocab_size=256,
                         attention=dict(n_head=4, head_dim=16, softmax_scale=1.0)),
    "debug-transformer": _transformer(64, 2, 4, 128, 256),
}
