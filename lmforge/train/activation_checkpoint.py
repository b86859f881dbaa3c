"""Activation checkpointing: keep only each block's input in the forward pass and recompute the block's
activations during the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost"), trading about one extra forward pass for activation memory that no longer grows with the
work inside each block.

`checkpoint_blocks(model)` replaces the `forward` of every `Block` instance (an instance attribute,
which `nn.Module.__call__` finds before the class's method) with one that runs the class's forward
under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`. No module is wrapped or moved,
so parameter names and state_dict keys stay exactly those of the plain model: checkpoints load
either way, FSDP2 can shard the blocks afterwards, and `del block.forward` undoes it. RNG states are
stashed and restored around the recomputation (the default), so dropout masks, and therefore the
gradients, are those of the plain model. With gradients disabled (evaluation, generation) the block
runs as usual.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.nn.block import Block


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward  # the class's forward; the instance attribute is this function
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    bound = module.__dict__.get("forward")
    return isinstance(bound, types.MethodType) and bound.__func__ is _checkpointed_forward


def checkpoint_blocks(model: nn.Module, block_type: type[nn.Module] = Block) -> int:
    """Recompute every `block_type` module of `model` in the backward pass; returns how many there are.
    Idempotent. A bound method (not a closure) is stored, so `copy.deepcopy` rebinds it to the copy."""
    n = 0
    for module in model.modules():
        if isinstance(module, block_type):
            if not is_checkpointed(module):
                module.forward = types.MethodType(_checkpointed_forward, module)
            n += 1
    return n
