"""Declarative checkpoint conversion: a list of `Rule`s per family maps our parameter names to
Hugging Face's, with an explicit op for the few tensors that need more than a rename
(transposes, fused q/k/v, stacked experts). The same rules run in both directions.

Patterns: `{i}` is a layer index (`{j}` a decoder layer of an encoder-decoder), `{e}` an expert
index (expanded on the HF side and stacked).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from lmforge.config import ModelConfig


class Identity:
    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0]

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


class Transpose(Identity):
    """GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in)."""

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0].t().contiguous()

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.t().contiguous()]


@dataclass(frozen=True)
class Concat:
    """Several HF tensors fused along dim 0 (q, k, v -> qkv)."""

    sizes: tuple[int, ...]
    transpose: bool = False

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        fused = torch.cat(parts, dim=0)
        return fused.t().contiguous() if self.transpose else fused

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.transpose:
            tensor = tensor.t()
        return [t.contiguous() for t in tensor.split(list(self.sizes), dim=0)]


class Stack(Identity):
    """Per-expert HF tensors -> one (E, ...) tensor."""

    def to_ours(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts)

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return list(tensor.unbind(0))


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: tuple[str, ...]
    op: object = field(default_factory=Identity)


def _counts(cfg: ModelConfig) -> dict[str, int]:
    """How far each placeholder runs: {i} encoder/decoder-only layers, {j} decoder layers of an
    encoder-decoder, {e} experts."""
    return {"i": cfg.n_layer, "j": cfg.n_decoder_layer, "e": cfg.moe.n_experts if cfg.moe else 0}


def _expand(rules: Iterable[Rule], cfg: ModelConfig) -> list[tuple[str, list[str], object]]:
    counts = _counts(cfg)
    out = []
    for rule in rules:
        layer_keys = [k for k in ("i", "j") if "{" + k + "}" in rule.ours]
        indices = [{}] if not layer_keys else [{layer_keys[0]: n} for n in range(counts[layer_keys[0]])]
        for index in indices:
            ours = rule.ours.format(**index)
            hf_keys: list[str] = []
            for pattern in rule.hf:
                experts = range(counts["e"]) if "{e}" in pattern else [None]
                hf_keys += [pattern.format(**index, e=e) for e in experts]
            out.append((ours, hf_keys, rule.op))
    return out


def hf_to_ours(hf_state: Mapping[str, torch.Tensor], rules: Iterable[Rule], cfg: ModelConfig,
               ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Apply the rules to an HF state dict; every HF tensor must be used or explicitly ignored."""
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key, hf_keys, op in _expand(rules, cfg):
        absent = [k for k in hf_keys if k not in hf_state]
        if absent:
            missing += absent
            continue
        ours[key] = op.to_ours([hf_state[k] for k in hf_keys])
        used.update(hf_keys)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}; "
                         "is config.json from the same model as the weights?")
    unused = sorted(k for k in hf_state if k not in used and not k.endswith(ignore))
    if unused:
        raise ValueError(f"checkpoint has {len(unused)} tensor(s) this config does not use, e.g. {unused[:5]}; "
                         "the checkpoint's architecture differs from what its config.json describes")
    return ours


def ours_to_hf(state: Mapping[str, torch.Tensor], rules: Iterable[Rule], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    hf: dict[str, torch.Tensor] = {}
    for key, hf_keys, op in _expand(rules, cfg):
        for hf_key, tensor in zip(hf_keys, op.to_hf(state[key]), strict=True):
            hf[hf_key] = tensor
    return hf
