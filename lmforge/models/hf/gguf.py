"""GGUF (llama.cpp) import for the Llama family, through the `gguf` package.

Quantised tensors are dequantised to fp32. llama.cpp stores q/k projections permuted for its
interleaved RoPE; they are permuted back to the rotate-half layout, then the tensors get their
Hugging Face names so the Llama adapter's key map does the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` (convert_hf_to_gguf.py): rows (H, 2, D/2) were stored as (H, D/2, 2)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A GGUF file -> (an HF-style Llama config.json dict, HF-named fp32 tensors)."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported; only 'llama' GGUF files load")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv_head = int(_field(reader, "llama.attention.head_count_kv", n_head))
    d_model = int(_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path.name} carries rope_freqs (Llama-3.1 frequency factors), which is not supported")
    vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", d_model // n_head)),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(_field(reader, "llama.rope.freq_base", 1e4))},
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling == "linear":
        config["rope_parameters"].update(rope_type="linear", factor=float(_field(reader, "llama.rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise ValueError(f"{path.name}: rope scaling {scaling!r} is not supported")

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = tensor.name
        if name.startswith("blk."):
            _, i, kind, suffix = name.split(".", 3)
            if kind == "attn_q":
                weight = unpermute_rope(weight, n_head)
            elif kind == "attn_k":
                weight = unpermute_rope(weight, n_kv_head)
            if kind not in _LAYER_NAMES:
                raise ValueError(f"{path.name}: tensor {name!r} has no Llama counterpart")
            hf_name = f"model.layers.{i}.{_LAYER_NAMES[kind]}.{suffix}"
        elif name in _TENSOR_NAMES:
            hf_name = _TENSOR_NAMES[name]
        else:
            raise ValueError(f"{path.name}: tensor {name!r} has no Llama counterpart")
        # F32 tensors are views of GGUFReader's read-only memory map: copy, or an in-place update segfaults.
        state[hf_name] = torch.from_numpy(np.array(weight, dtype=np.float32, order="C"))
    return config, state
