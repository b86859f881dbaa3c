"""Model families: token ids -> logits. `build_model` picks the class from `cfg.arch`."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import EncoderModel
from lmforge.models.encoder_decoder import EncoderDecoderLM
from lmforge.models.init import init_weights
from lmforge.models.output import ModelOutput

MODELS: dict[str, type[nn.Module]] = {"decoder": DecoderLM, "encoder": EncoderModel,
                                      "encoder_decoder": EncoderDecoderLM}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.arch not in MODELS:
        raise ValueError(f"arch {cfg.arch!r} has no model class; valid: {sorted(MODELS)}")
    return MODELS[cfg.arch]


def build_model(cfg: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> nn.Module:
    """Construct on the meta device (no memory, no init work), materialise on `device`, initialise."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.to_empty(device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    init_weights(model, cfg, generator)
    return model.to(dtype)


__all__ = ["MODELS", "ModelOutput", "build_model", "init_weights", "model_class"]
