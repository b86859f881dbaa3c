"""What a Hugging Face family adapter provides."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.models.hf.convert import Rule


@dataclass(frozen=True)
class Adapter:
    model_type: str  # config.json "model_type"
    architecture: str | Callable[[ModelConfig], str]  # HF class in config.json "architectures"; may follow the head
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    ignore: tuple[str, ...] = ()  # HF tensor-name suffixes that are buffers, not weights
    canonical: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda state: state
    # settles what config.json leaves open from the (canonical) tensor names, e.g. BertModel's optional pooler
    refine_config: Callable[[ModelConfig, Collection[str]], ModelConfig] = lambda cfg, hf_keys: cfg

    def architecture_for(self, cfg: ModelConfig) -> str:
        return self.architecture(cfg) if callable(self.architecture) else self.architecture


HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
TO_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def activation_from_hf(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def require(cfg: ModelConfig, condition: bool, what: str, model_type: str) -> None:
    if not condition:
        raise ValueError(f"this config cannot be written as Hugging Face {model_type!r}: {what}; "
                         "set hf_model_type to a family that has it, or change the config")


def plain_decoder(cfg: ModelConfig) -> bool:
    """A decoder-only LM with unscaled embeddings and a bare vocabulary projection."""
    return (cfg.arch == "decoder" and cfg.embed_scale == 1.0 and not cfg.embed_norm and not cfg.type_vocab_size
            and not cfg.lm_head_bias and not cfg.head_transform and cfg.head_input_scale == 1.0)
