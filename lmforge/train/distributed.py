"""Data parallelism for the training loop: this process's place in a torchrun job (`Dist`), the model
as the loop runs it (`parallelize`: DDP or FSDP2, activation checkpointing, compile), and checkpoints
that do not depend on either (`saveable`, `loadable`).

train.parallel (same recipe, any number of processes; with one process both are the plain model):
- ddp: every process holds the whole model and optimiser; gradients are all-reduced (averaged) in
  the backward pass of the last micro-batch of a step (`no_sync` on the others).
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`, torchtitan's recipe): each Block, then the root
  (embeddings, final norm, head), is sharded over the processes; parameters, gradients and AdamW
  moments are DTensors holding 1/world of each tensor, whole blocks are all-gathered just in time
  for their forward and backward, gradients are reduce-scattered (averaged, as DDP). Gradient
  accumulation skips the reduce-scatter on all but the last micro-batch
  (`set_requires_gradient_sync(False)`), clipping computes the global norm over the shards. Works
  with gloo on the CPU (torch 2.13) as with NCCL.

Checkpoints are always in the single-process layout of `lmforge.train.checkpoint`: the model's full
state dict and torch's optimizer state dict keyed by parameter index (the order of the optimizer's
param groups). Under FSDP2 the full state is gathered to rank 0 for saving
(`get_model_state_dict` / `get_optimizer_state_dict` with `full_state_dict=True, cpu_offload=True`,
optimizer state converted from parameter names to indices) and every rank takes its shard of the full
state when loading (`set_model_state_dict` / `set_optimizer_state_dict`, names back from indices),
so a run saved with 2 FSDP processes resumes with 1 process, or with DDP, and the other way round.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.nn.block import Block
from lmforge.train.activation_checkpoint import checkpoint_blocks
from lmforge.train.recipe import PARALLEL, TrainSection


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_main = local == 0  # the first process on this node
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, fn):
        """fn() run by rank 0 alone, its result handed to every rank (pickled through the process group): work
        whose answer all ranks need but one can find, such as hashing a checkpoint's files, which would
        otherwise read the same gigabytes once per process. An exception on rank 0 reaches every rank: rank 0
        raises its own, the others a RuntimeError (a ValueError for a ValueError) with its message."""
        if self.world == 1:
            return fn()
        box: list = [None, None]  # (result, (exception type name, message))
        error = None
        if self.main:
            try:
                box[0] = fn()
            except Exception as e:  # every rank must reach the broadcast, or the others wait forever
                error, box[1] = e, (type(e).__name__, str(e))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[1] is not None:
            kind, message = box[1]
            raise (ValueError if kind == "ValueError" else RuntimeError)(f"rank 0: {message}")
        return box[0]

    def close(self) -> None:
        """Leave the job. Collect garbage first: gloo's worker threads can still hold tensors of
        finished collectives (gradient buckets), and a process group torn down under them, or an
        interpreter exiting with them, aborts with "terminate called without an active exception"."""
        if self.world > 1 and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class FSDPRunner(nn.Module):
    """An FSDP2-sharded model with DDP's `no_sync()`, so the loop accumulates gradients the same way
    under both: inside `no_sync()` FSDP2 keeps the unsharded gradients and skips the reduce-scatter."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        sharded = self.module._orig_mod if hasattr(self.module, "_orig_mod") else self.module  # under compile
        sharded.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            sharded.set_requires_gradient_sync(True)


def parallelize(model: nn.Module, train: TrainSection, d: Dist) -> nn.Module:
    """Prepare `model` for training in this job as `train` (parallel, activation_checkpointing, compile)
    asks, and return the module the loop calls (the runner).

    The order is torchtitan's (`parallelize_llama`): activation checkpointing, then FSDP2 sharding,
    both in place (names and state_dict keys unchanged), then torch.compile, then the DDP or
    FSDP runner. Call it before building the optimizer: FSDP2 replaces the parameters by DTensors.
    Checkpoints and clipping use `model` itself, the runner is only for forward / backward.
    """
    if train.parallel not in PARALLEL:
        raise ValueError(f"train.parallel={train.parallel!r} is not supported; choose one of {PARALLEL}")
    if train.activation_checkpointing:
        checkpoint_blocks(model)
    fsdp = train.parallel == "fsdp" and d.world > 1
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # The LM head returns logits sliced from the padded vocabulary, a view; nothing modifies model
        # outputs in place, so FSDP2's warning about in-place ops on returned views does not apply.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
    runner = torch.compile(model) if train.compile else model
    if d.world == 1:
        return runner
    if fsdp:
        return FSDPRunner(runner)
    return torch.nn.parallel.DistributedDataParallel(runner, device_ids=[d.device] if d.device.type == "cuda"
                                                     else None)


# --- checkpoints in the single-process layout ---------------------------------------------------


class Frozen:
    """A state dict computed ahead, in the shape `lmforge.train.checkpoint.save_checkpoint` reads."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter in torch's index order (group by group)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) -> keyed by index
    (`torch.optim.Optimizer.state_dict`'s), `names[i]` being parameter i."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `optimizer_state_by_index`."""
    if sum(len(group["params"]) for group in state["param_groups"]) != len(names):
        raise ValueError(f"the checkpoint's optimizer has {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters but this one has {len(names)}; build the model and optimizer from the run's "
                         "recipe before loading")
    return {"state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in state["param_groups"]]}


def saveable(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """(model, optimizer) to hand to `checkpoint.save_checkpoint` on rank 0: the objects themselves, or,
    for an FSDP2 model, their full state dicts gathered to rank 0 (on the CPU; other ranks get empty
    ones). Under FSDP2 this is a collective: call it on every rank."""
    if not is_sharded(model):
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _full_options(cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if state:  # rank 0
        state = optimizer_state_by_index(state, _param_names(model, optimizer))
    return Frozen(weights), Frozen(state)


class _FullModel:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:  # the names are those of the unsharded model
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state, options=_full_options(strict=strict))


class _FullOptimizer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        by_name = optimizer_state_by_name(state, _param_names(self.model, self.optimizer))
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=_full_options())


def loadable(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[Any, Any]:
    """(model, optimizer) to hand to `checkpoint.load_checkpoint` on every rank: the objects themselves,
    or, for an FSDP2 model, views that take each rank's shard of the full state read from the files."""
    if not is_sharded(model):
        return model, optimizer
    return _FullModel(model), None if optimizer is None else _FullOptimizer(model, optimizer)
