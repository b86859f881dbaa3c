"""All weight initialisation, in one place. Models are built on the meta device and materialised here.

Two schemes, chosen by `cfg.init_scheme`:

normal (GPT-2 / nanoGPT): every Linear, Embedding and expert weight ~ N(0, init_std); projections that
write into the residual stream (attention `o`, MLP `down`, expert `w_down`) get init_std / sqrt(2 *
n_layers) so the residual variance stays O(1) with depth (Radford et al. 2019, §2.3).

fan_in (T5 / Mesh TensorFlow): weights ~ N(0, 1/sqrt(fan_in)), embeddings ~ N(0, 1), and query
projections a further 1/sqrt(head_dim) because T5 does not scale its attention scores. With T5's
tied head (hidden scaled by d_model^-0.5) this starts at sensible logits where N(0, 0.02) would not.

Both: biases zero, norm gains one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.norms import RMSNorm

_RESIDUAL_OUTPUTS = ("attn.o.weight", "cross_attn.o.weight", "mlp.down.weight", "mlp.w_down")
_QUERIES = ("attn.qkv.weight", "cross_attn.q.weight")


def _std(name: str, param: torch.Tensor, cfg: ModelConfig, residual_std: float) -> float:
    if cfg.init_scheme == "normal":
        return residual_std if name.endswith(_RESIDUAL_OUTPUTS) else cfg.init_std
    if param.ndim == 2 and name.endswith("embed.weight"):
        return 1.0
    return param.shape[-1] ** -0.5  # fan_in: the input dim of (out, in) and (E, out, in) weights


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    n_layers = cfg.n_layer + (cfg.n_decoder_layer if cfg.arch == "encoder_decoder" else 0)
    residual_std = cfg.init_std / math.sqrt(2 * n_layers)
    norms = {m for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))}
    for module in norms:
        if module.weight is not None:
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    norm_params = {id(p) for m in norms for p in m.parameters()}
    for name, param in model.named_parameters():
        if id(param) in norm_params:
            continue
        if param.ndim < 2:
            param.zero_()  # biases
            continue
        param.normal_(0.0, _std(name, param, cfg, residual_std), generator=generator)
        if cfg.init_scheme == "fan_in" and name.endswith(_QUERIES):
            rows = cfg.attention.n_head * cfg.attention.head_dim  # the query rows of a fused qkv
            param[:rows] *= cfg.attention.head_dim**-0.5
