"""Decoder-only presets: GPT-2, Llama, Mistral, Mixtral, Qwen2, SmolLM2."""

from __future__ import annotations

from typing import Any

# openai-community/gpt2 config.json: learned positions, pre-LN with biases, tanh-GELU, tied head.
_GPT2 = dict(
    arch="decoder", vocab_size=50257, d_model=768, n_layer=12,
    attention=dict(n_head=12, qkv_bias=True, out_bias=True),
    position=dict(kind="learned", max_seq_len=1024),
    norm=dict(kind="layer", eps=1e-5, bias=True),
    mlp=dict(d_ff=3072, activation="gelu_tanh", gated=False, bias=True),
    tie_embeddings=True, bos_token_id=50256, eos_token_id=50256, hf_model_type="gpt2",
)


def _llama(**kw: Any) -> dict[str, Any]:
    """Llama-family defaults: RoPE, RMSNorm, SwiGLU, no biases."""
    base: dict[str, Any] = dict(
        arch="decoder", norm=dict(kind="rms", eps=1e-5), mlp=dict(activation="silu", gated=True),
        hf_model_type="llama",
    )
    for key, value in kw.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return base


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": _GPT2,
    # openai-community/gpt2-medium config.json
    "gpt2-medium": {**_GPT2, "d_model": 1024, "n_layer": 24,
                    "attention": dict(n_head=16, qkv_bias=True, out_bias=True),
                    "mlp": dict(d_ff=4096, activation="gelu_tanh", gated=False, bias=True)},
    # meta-llama/Llama-3.2-1B config.json: GQA 32/8, RoPE theta 5e5 with llama3 scaling (factor 32)
    "llama-3.2-1b": _llama(
        vocab_size=128256, d_model=2048, n_layer=16, attention=dict(n_head=32, n_kv_head=8, head_dim=64),
        position=dict(kind="rope", max_seq_len=131072, rope_theta=500000.0, rope_scaling="llama3",
                      rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_seq_len=8192),
        mlp=dict(d_ff=8192), tie_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.1-8B config.json: llama3 scaling factor 8, untied head
    "llama-3.1-8b": _llama(
        vocab_size=128256, d_model=4096, n_layer=32, attention=dict(n_head=32, n_kv_head=8),
        position=dict(kind="rope", max_seq_len=131072, rope_theta=500000.0, rope_scaling="llama3",
                      rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_seq_len=8192),
        mlp=dict(d_ff=14336), tie_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    # mistralai/Mistral-7B-v0.1 config.json: sliding-window attention over 4096 keys
    "mistral-7b": _llama(
        vocab_size=32000, d_model=4096, n_layer=32, attention=dict(n_head=32, n_kv_head=8, sliding_window=4096),
        position=dict(kind="rope", max_seq_len=32768, rope_theta=10000.0), mlp=dict(d_ff=14336),
        tie_embeddings=False, bos_token_id=1, eos_token_id=2, hf_model_type="mistral",
    ),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts, top-2, router aux loss coef 0.02
    "mixtral-8x7b": _llama(
        vocab_size=32000, d_model=4096, n_layer=32, attention=dict(n_head=32, n_kv_head=8),
        position=dict(kind="rope", max_seq_len=32768, rope_theta=1e6), mlp=dict(d_ff=14336),
        moe=dict(n_experts=8, top_k=2, aux_loss_coef=0.02, z_loss_coef=0.0),
        tie_embeddings=False, bos_token_id=1, eos_token_id=2, hf_model_type="mixtral",
    ),
    # Qwen/Qwen2-0.5B-Instruct config.json: q/k/v biases, GQA 14/2, tied head
    "qwen2-0.5b": _llama(
        vocab_size=151936, d_model=896, n_layer=24, attention=dict(n_head=14, n_kv_head=2, qkv_bias=True),
        position=dict(kind="rope", max_seq_len=32768, rope_theta=1e6), norm=dict(eps=1e-6),
        mlp=dict(d_ff=4864), tie_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        hf_model_type="qwen2",
    ),
    # HuggingFaceTB/SmolLM2-135M config.json: a Llama with GQA 9/3 and a tied head
    "smollm2-135m": _llama(
        vocab_size=49152, d_model=576, n_layer=30, attention=dict(n_head=9, n_kv_head=3),
        position=dict(kind="rope", max_seq_len=8192, rope_theta=100000.0), mlp=dict(d_ff=1536),
        tie_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
}

# Tiny sizes of each family for tests and CPU runs: same blocks, toy dimensions.
_DEBUG = dict(vocab_size=256, d_model=64, n_layer=2)
PRESETS.update({
    "debug-gpt2": {**_GPT2, **_DEBUG, "attention": dict(n_head=4, qkv_bias=True, out_bias=True),
                   "position": dict(kind="learned", max_seq_len=128),
                   "mlp": dict(d_ff=256, activation="gelu_tanh", gated=False, bias=True),
                   "bos_token_id": 0, "eos_token_id": 0},
    "debug-llama": _llama(**_DEBUG, attention=dict(n_head=4, n_kv_head=2),
                          position=dict(kind="rope", max_seq_len=256, rope_theta=500000.0,
                                        rope_scaling="llama3", rope_factor=8.0,
                                        rope_original_max_seq_len=64),
                          mlp=dict(d_ff=128), tie_embeddings=True),
    "debug-mistral": _llama(**_DEBUG, attention=dict(n_head=4, n_kv_head=2, sliding_window=8),
                            position=dict(kind="rope", max_seq_len=256), mlp=dict(d_ff=128),
                            tie_embeddings=False, hf_model_type="mistral"),
    "debug-mixtral": _llama(**_DEBUG, attention=dict(n_head=4, n_kv_head=2),
                            position=dict(kind="rope", max_seq_len=256, rope_theta=1e6), mlp=dict(d_ff=96),
                            moe=dict(n_experts=4, top_k=2), tie_embeddings=False, hf_model_type="mixtral"),
    "debug-qwen2": _llama(**_DEBUG, attention=dict(n_head=4, n_kv_head=1, qkv_bias=True),
                          position=dict(kind="rope", max_seq_len=256, rope_theta=1e6), norm=dict(eps=1e-6),
                          mlp=dict(d_ff=128), tie_embeddings=True, hf_model_type="qwen2"),
})
