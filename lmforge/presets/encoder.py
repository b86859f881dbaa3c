"""Encoder-only presets: BERT sizes (with the masked-LM head) and a debug size."""

from __future__ import annotations

from typing import Any


def _bert(d_model: int, n_layer: int, n_head: int, d_ff: int, **kw: Any) -> dict[str, Any]:
    """google-research/bert: post-LayerNorm (eps 1e-12), exact GELU, learned positions (512), two
    segment embeddings, a norm after the embeddings, and the MLM head (transform + tied decoder + bias)."""
    return dict(
        arch="encoder", vocab_size=30522, d_model=d_model, n_layer=n_layer,
        attention=dict(n_head=n_head, qkv_bias=True, out_bias=True, dropout=0.1),
        position=dict(kind="learned", max_seq_len=512),
        norm=dict(kind="layer", eps=1e-12, bias=True, placement="post"),
        mlp=dict(d_ff=d_ff, activation="gelu", gated=False, bias=True),
        type_vocab_size=2, embed_norm=True, final_norm=False, dropout=0.1,
        head="lm", head_transform=True, lm_head_bias=True, tie_embeddings=True, pad_token_id=0,
        hf_model_type="bert",
    ) | kw


PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": _bert(768, 12, 12, 3072),  # google-bert/bert-base-uncased config.json
    "bert-mini": _bert(256, 4, 4, 1024),  # google/bert_uncased_L-4_H-256_A-4 config.json
    "bert-tiny": _bert(128, 2, 2, 512),  # google/bert_uncased_L-2_H-128_A-2 config.json
    "debug-bert": _bert(64, 2, 4, 128, vocab_size=256, position=dict(kind="learned", max_seq_len=128)),
}
