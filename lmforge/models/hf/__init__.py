"""Real checkpoints in and out: Hugging Face folders (safetensors) and GGUF files.

    model = load(path)          # HF checkpoint folder or .gguf file -> our model, eval mode, fp32
    save_hf(model, out_dir)     # a folder transformers' AutoModelForCausalLM loads with equal logits
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models import model_class
from lmforge.models.hf import bart, bert, gpt2, llama, t5
from lmforge.models.hf.adapter import Adapter
from lmforge.models.hf.convert import hf_to_ours, ours_to_hf
from lmforge.models.hf.gguf import read_gguf
from lmforge.models.hf.io import read_config, read_weights, write_checkpoint

ADAPTERS: dict[str, Adapter] = {**bart.ADAPTERS, "bert": bert.ADAPTER, "gpt2": gpt2.ADAPTER, **llama.ADAPTERS,
                               "t5": t5.ADAPTER}


def adapter_for(model_type: str | None) -> Adapter:
    if model_type not in ADAPTERS:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF family a config is written as when `cfg.hf_model_type` does not say."""
    if cfg.hf_model_type is not None:
        return cfg.hf_model_type
    if cfg.arch != "decoder":
        if cfg.position.kind == "relative":
            return "t5"
        if cfg.arch == "encoder":
            return "bert"
        return "marian" if cfg.position.kind == "sinusoidal" else "bart"
    if cfg.moe is not None:
        return "mixtral"
    if cfg.position.kind == "learned":
        return "gpt2"
    if cfg.attention.qkv_bias and not cfg.attention.out_bias:
        return "qwen2"
    return "mistral" if cfg.attention.sliding_window else "llama"


def from_hf_state(hf_config: dict, hf_state: dict[str, torch.Tensor], *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build our model from an HF config dict and HF-named tensors."""
    adapter = adapter_for(hf_config.get("model_type"))
    cfg = adapter.config_from_hf(hf_config)
    hf_state = adapter.canonical(dict(hf_state))
    cfg = adapter.refine_config(cfg, hf_state.keys())
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    state = hf_to_ours(hf_state, adapter.rules(cfg), cfg, ignore=adapter.ignore)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load(path: str | Path, *, allow_pickle: bool = False, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a Hugging Face checkpoint folder (config.json + safetensors), a Llama-family .gguf file, or a
    quantised folder written by `lmforge.models.quantize.save_quantized`."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        hf_config, hf_state = read_gguf(path)
    elif path.is_dir():
        hf_config = read_config(path)
        if "quantization" in hf_config and "lmforge_config" in hf_config:  # our quantised format
            from lmforge.models.quantize import load_quantized

            return load_quantized(path, device=device, dtype=dtype)
        adapter_for(hf_config.get("model_type"))  # fail on an unsupported family before reading weights
        hf_state = read_weights(path, allow_pickle=allow_pickle)
    else:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file")
    return from_hf_state(hf_config, hf_state, device=device, dtype=dtype)


def save_hf(model: nn.Module, out_dir: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as a Hugging Face checkpoint folder (config.json + safetensors) that the matching
    transformers class (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, ...) loads."""
    cfg: ModelConfig = model.config
    model_type = infer_model_type(cfg)
    adapter = adapter_for(model_type)
    hf_config = {**adapter.config_to_hf(cfg), "model_type": model_type,
                 "architectures": [adapter.architecture_for(cfg)], "dtype": "float32"}
    state = dict(model.state_dict())
    for key in ("embed.weight", "head.proj.weight", "head.bias"):  # drop rows added by pad_vocab_multiple
        if key in state:
            state[key] = state[key][: cfg.vocab_size]
    state = ours_to_hf(state, adapter.rules(cfg), cfg)
    out = Path(out_dir)
    write_checkpoint(out, hf_config, {k: v.float() for k, v in state.items()}, max_shard_bytes=max_shard_bytes)
    return out


__all__ = ["ADAPTERS", "from_hf_state", "infer_model_type", "load", "save_hf"]
