"""Weight-only quantisation of a whole model, and quantised checkpoint folders.

    quantize_model(model, bits=8)             # in place: the blocks' nn.Linear -> Int8Linear / Int4Linear
    save_quantized(model, out_dir, tokenizer)  # config.json (+ "quantization") + model.safetensors (+ tokenizer)
    model = lmforge.load(out_dir)              # recognises the folder, rebuilds and repacks for the kernel

What is quantised: every `nn.Linear` inside the blocks (attention q/kv/qkv/o, dense and gated MLPs).
What is not, and why:
- embeddings (a lookup, not a matmul; and with tied embeddings the LM head reads the same matrix);
- the head (`head.*`: LM projection, classifiers, BERT's pooler and MLM transform): the LM head is often
  tied to the embedding, and the last projection is the most sensitive to error. `include_head=True`
  quantises the head's Linear modules; a tied LM head (which reads the embedding matrix) gets a quantised
  copy of that matrix as its own projection, so decoding reads 1 (int8) or 0.5 (int4) bytes per head
  weight instead of 4, at the cost of storing the copy beside the full-precision lookup table;
- MoE experts: `nn/moe.py` keeps them as stacked (E, F, D) parameters applied with `F.linear`, not as
  Linear modules, so they stay full precision; MoE routers stay too (small, and a routing flip changes
  which expert runs, a much larger error than the weight error itself);
- norms and biases (tiny; biases of quantised layers stay full precision inside the layer).

The folder holds our own parameter names (not Hugging Face's: transformers has no reader for these int8
/ packed int4 tensors), the ModelConfig as JSON and a `quantization` block:
{"method": "weight_only", "bits": 4, "group_size": 64, "modules": [...]}. int8 weights are int8 (O, I)
with fp32 scales (O,); int4 weights are uint8 (O, I_p / 2) in the portable nibble layout of
`nn.quant.pack_int4` with bf16 `scales_and_zeros` (I_p / G, O, 2). Safetensors only, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models import model_class
from lmforge.models.hf.io import read_weights, write_checkpoint
from lmforge.nn.quant import QUANTIZED_LINEARS, Int4Linear, empty_quantized_linear, quantize_linear

QUANT_KEY = "quantization"


def _targets(model: nn.Module, include_head: bool) -> list[str]:
    """Qualified names of the nn.Linear modules `quantize_model` replaces (see the module docstring)."""
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if name.split(".")[-1] == "router" or (name.startswith("head.") and not include_head):
            continue
        names.append(name)
    return names


def _tied_lm_head(model: nn.Module) -> bool:
    """A language-model head that multiplies by the embedding matrix (no Linear of its own)."""
    head = getattr(model, "head", None)
    return getattr(head, "proj", False) is None and hasattr(model, "embed")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, bits: int, group_size: int = 64, include_head: bool = False) -> nn.Module:
    """Replace the model's Linear layers (see the module docstring for which) by weight-only int8
    (`bits=8`, per output channel) or int4 (`bits=4`, groups of `group_size` inputs) layers, in place.
    Returns the model, in eval mode (quantised layers are for inference)."""
    if bits not in QUANTIZED_LINEARS:
        raise ValueError(f"bits must be one of {sorted(QUANTIZED_LINEARS)} (weight-only int8 / int4), got {bits}")
    if bits == 4 and group_size not in (32, 64, 128, 256):
        raise ValueError(f"int4 group_size must be 32, 64, 128 or 256 (the CPU kernel's), got {group_size}")
    names = _targets(model, include_head)
    if include_head and _tied_lm_head(model):
        # The head reads the embedding matrix: give it a quantised copy (the lookup table stays as it is).
        emb = model.embed.weight
        model.head.proj = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
        model.head.proj.weight.data.copy_(emb.detach())
        names.append("head.proj")
    if not names:
        raise ValueError("the model has no nn.Linear layers left to quantise (already quantised?)")
    for name in names:
        _replace(model, name, quantize_linear(model.get_submodule(name), bits, group_size))
    return model.eval()


def quantization_info(model: nn.Module) -> dict[str, Any] | None:
    """The `quantization` block describing a quantised model, or None for a full-precision one."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, tuple(QUANTIZED_LINEARS.values()))}
    if not layers:
        return None
    bits = {8 if type(m) is QUANTIZED_LINEARS[8] else 4 for m in layers.values()}
    groups = {m.group_size for m in layers.values() if isinstance(m, Int4Linear)}
    if len(bits) > 1 or len(groups) > 1:
        raise ValueError(f"mixed quantisation (bits {sorted(bits)}, group sizes {sorted(groups)}) cannot be saved; "
                         "quantise the whole model with one `quantize_model` call")
    info = {"method": "weight_only", "bits": bits.pop(), "modules": sorted(layers)}
    if groups:
        info["group_size"] = groups.pop()
    return info


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a quantised model (and its tokenizer, if given) to a folder `lmforge.load` reads back."""
    info = quantization_info(model)
    if info is None:
        raise ValueError("the model is not quantised; call quantize_model(model, bits) first, or use save_hf")
    out = Path(out_dir)
    config = {"lmforge_config": model.config.to_dict(), QUANT_KEY: info}
    write_checkpoint(out, config, dict(model.state_dict()))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def is_quantized_folder(config: dict[str, Any]) -> bool:
    return QUANT_KEY in config and "lmforge_config" in config


def load_quantized(folder: str | Path, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model written by `save_quantized`: the architecture on the meta device, the listed
    layers as empty quantised layers, then the saved tensors (int4 repacked for the CPU kernel)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if not is_quantized_folder(config):
        raise ValueError(f"{folder}/config.json has no {QUANT_KEY!r} block; it is not a quantised lmforge folder")
    info = config[QUANT_KEY]
    cfg = ModelConfig.from_dict(config["lmforge_config"])
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    for name in info["modules"]:
        if name == "head.proj" and _tied_lm_head(model):  # a quantised copy of a tied embedding
            with torch.device("meta"):
                model.head.proj = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{folder}: quantised module {name!r} is not a Linear layer of this architecture")
        _replace(model, name, empty_quantized_linear(linear.in_features, linear.out_features, linear.bias is not None,
                                                     info["bits"], info.get("group_size", 64)))
    state = read_weights(folder)
    # floats to `dtype` except the bf16 int4 scales (the kernel's dtype); a tensor read at an odd address is
    # copied, as the int8 kernel needs 64-byte aligned weights
    state = {k: v.to(dtype) if v.is_floating_point() and v.dtype != torch.bfloat16 else v for k, v in state.items()}
    state = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


__all__ = ["load_quantized", "quantization_info", "quantize_model", "save_quantized", "weight_bytes"]
