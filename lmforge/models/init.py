"""All weight initialisation, in one place.

Scheme (GPT-2 / nanoGPT): every Linear, Embedding and expert weight ~ N(0, init_std); biases zero;
norm gains one; projections that write into the residual stream (attention `o`, MLP `down`, expert
`w_down`) get std / sqrt(2 * n_layers) so the residual variance stays O(1) with depth (Radford et
al. 2019, §2.3). Models are built on the meta device and materialised here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.norms import RMSNorm

_RESIDUAL_OUTPUTS = ("attn.o.weight", "cross_attn.o.weight", "mlp.down.weight", "mlp.w_down")


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    n_layers = cfg.n_layer + (cfg.n_decoder_layer if cfg.arch == "encoder_decoder" else 0)
    residual_std = cfg.init_std / math.sqrt(2 * n_layers)
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            if module.weight is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    for name, param in model.named_parameters():
        if param.ndim < 2:
            if not _is_norm_param(model, name):
                param.zero_()  # biases
            continue
        std = residual_std if name.endswith(_RESIDUAL_OUTPUTS) else cfg.init_std
        param.normal_(0.0, std, generator=generator)


def _is_norm_param(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(owner, (nn.LayerNorm, RMSNorm))
