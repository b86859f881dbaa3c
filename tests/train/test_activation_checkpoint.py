"""Activation checkpointing: the same gradients as the plain model, far fewer saved activations, and
nothing renamed."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.train.activation_checkpoint import checkpoint_blocks, is_checkpointed

PRESETS = ["debug-llama", "debug-mixtral", "debug-t5", "debug-bert"]  # dense, MoE, encoder-decoder, encoder


def _inputs(cfg: ModelConfig) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (2, 24), generator=g)
    if cfg.arch == "encoder_decoder":
        return (ids, torch.randint(4, cfg.vocab_size, (2, 12), generator=g)), {}
    return (ids,), {}


def _run(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes of tensors autograd saves for the backward pass, and the gradients."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)
        loss = out.logits.float().logsumexp(-1).mean() + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    return saved, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
def test_checkpointed_blocks_give_the_same_gradients_with_fewer_saved_activations(preset):
    cfg = ModelConfig.from_preset(preset, dropout=0.1, n_layer=3)
    plain = build_model(cfg, seed=0).train()
    checkpointed = copy.deepcopy(plain)
    assert checkpoint_blocks(checkpointed) == cfg.n_layer + (cfg.n_decoder_layer if cfg.arch == "encoder_decoder"
                                                              else 0)
    assert list(checkpointed.state_dict()) == list(plain.state_dict()), "parameter names must not change"
    args, kwargs = _inputs(cfg)
    plain_bytes, plain_grads = _run(plain, args, kwargs)
    ckpt_bytes, ckpt_grads = _run(checkpointed, args, kwargs)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():  # recomputation replays the same ops on the same inputs and RNG
        assert torch.allclose(ckpt_grads[name], grad, rtol=0, atol=1e-6), f"{name} differs under checkpointing"
    assert ckpt_bytes < 0.4 * plain_bytes, f"saved {ckpt_bytes} bytes with checkpointing vs {plain_bytes} without"


def test_checkpointing_is_idempotent_copyable_and_undoable():
    cfg = ModelConfig.from_preset("debug-llama")
    model = build_model(cfg, seed=0)
    checkpoint_blocks(model)
    checkpoint_blocks(model)
    block = model.blocks[0]
    assert is_checkpointed(block) and "forward" in vars(block), "an instance attribute, the class is untouched"
    clone = copy.deepcopy(model)
    assert clone.blocks[0].forward.__self__ is clone.blocks[0], "a copy must run its own parameters"
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():  # no checkpointing without gradients; outputs unchanged
        expected = build_model(cfg, seed=0)(ids).logits
        assert torch.equal(model(ids).logits, expected)
    del block.forward
    assert not is_checkpointed(block) and is_checkpointed(model.blocks[1])
