"""Training recipes: one YAML file -> `Recipe`, every field documented here and reachable from the
command line as `--section.field=value` (values parsed as YAML: `--optim.lr=1e-3`,
`--model.overrides.n_layer=4`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.train.optim import OptimConfig
from lmforge.train.schedule import ScheduleConfig

OBJECTIVES = ("clm",)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelSection:
    preset: str = "debug-llama"  # a name from `lmforge presets`
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields; vocab_size comes from the tokenizer


@dataclass
class TokenizerSection:
    path: str | None = None  # an existing tokenizer folder; None: train one on the data (cached)
    kind: str = "bpe"  # when training: bpe, wordpiece or unigram
    vocab_size: int = 4096


@dataclass
class DataSection:
    inputs: list[str] = field(default_factory=lambda: ["python-code"])  # corpus names, files, folders, globs
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    val_fraction: float = 0.02  # documents held out for validation
    objective: str = "clm"  # causal LM on packed documents
    document_attention: bool = False  # packed documents do not attend to each other


@dataclass
class BatchSection:
    seq_len: int = 128
    micro_batch: int = 8  # sequences per forward pass on each process
    global_batch: int = 8  # sequences per optimiser step over all processes (micro x accumulation x world)


@dataclass
class TrainSection:
    steps: int = 100  # optimiser steps
    seed: int = 0
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast + gradient scaler, GPU only)
    label_smoothing: float = 0.0
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    device: str = "auto"  # auto (cuda if available), cpu or cuda


@dataclass
class EvalSection:
    every: int = 50  # steps between evaluations (and at the end)
    batches: int = 8  # validation batches per evaluation


@dataclass
class CheckpointSection:
    every: int = 50  # steps between checkpoints (and at the end)
    keep_last: int = 3  # plus the best by validation loss


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def __post_init__(self) -> None:
        if self.data.objective not in OBJECTIVES:
            raise ValueError(f"data.objective={self.data.objective!r} is not supported; choose one of {OBJECTIVES}")
        if self.train.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.train.precision!r} is not supported; choose one of {PRECISIONS}")
        for name in ("batch.seq_len", "batch.micro_batch", "batch.global_batch", "train.steps", "eval.every",
                     "checkpoint.every", "checkpoint.keep_last"):
            section, key = name.split(".")
            if getattr(getattr(self, section), key) < 1:
                raise ValueError(f"{name}={getattr(getattr(self, section), key)} must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, YAML-safe


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """A dataclass from a nested dict, refusing unknown keys with the list of valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'recipe'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown recipe key(s) {[f'{where}{k}' for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_override(data: dict[str, Any], override: str) -> None:
    """`section.key=value` (value parsed as YAML) into the nested dict `data`."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} must look like --section.key=value, e.g. --optim.lr=1e-3")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (None: all defaults) and apply `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist; see recipes/ for examples")
        data = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        apply_override(data, override)
    return _build(Recipe, data, "")
