"""Training recipes: one YAML file -> `Recipe`, every field documented here and reachable from the
command line as `--section.field=value` (values parsed as YAML: `--optim.lr=1e-3`,
`--model.overrides.n_layer=4`). A recipe may start with `extends: other.yaml` (relative to its own
folder) and give only what differs from that one; see `read_recipe_file`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.train.optim import OptimConfig
from lmforge.train.schedule import ScheduleConfig


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, except that `1e-3` is a float (YAML 1.2) rather than the
    string YAML 1.1 makes of an exponent without a dot, which would only fail later as a comparison error."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


OBJECTIVES = ("clm", "mlm", "span", "seq2seq")  # see lmforge.train.objectives
PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")  # see lmforge.train.distributed
MATMULS = ("auto", "aten", "onednn")  # see lmforge.nn.packed.resolve_matmul


@dataclass
class ModelSection:
    preset: str = "debug-llama"  # a name from `lmforge presets`
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields; vocab_size and the special
    # token ids (bos, eos, pad) come from the tokenizer


@dataclass
class TokenizerSection:
    path: str | None = None  # an existing tokenizer folder; None: train one on the data (cached)
    kind: str = "bpe"  # when training: bpe, wordpiece (has [MASK], for mlm) or unigram
    vocab_size: int = 4096  # every token, special ones and sentinels included
    sentinels: int = 0  # T5's <extra_id_0>, ... at the end of the vocabulary (span corruption needs them; T5: 100)
    max_chars: int | None = None  # train on the first documents up to this many characters (None: all)


@dataclass
class DataSection:
    inputs: list[str] = field(default_factory=lambda: ["python-code"])  # corpus names, files, folders, globs;
    # for seq2seq: pair corpora (translation-de, summaries), .jsonl with source/target, or .tsv files
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    val_fraction: float = 0.02  # documents held out for validation
    objective: str = "clm"  # clm (decoder), mlm (encoder), span (T5 corruption) or seq2seq (pairs): train/objectives.py
    document_attention: bool = False  # packed documents do not attend to each other


@dataclass
class BatchSection:
    seq_len: int = 128  # tokens per sequence; span: corrupted input length; seq2seq: max source and target length
    micro_batch: int = 8  # sequences per forward pass on each process
    global_batch: int = 8  # sequences per optimiser step over all processes (micro x accumulation x world)


@dataclass
class TrainSection:
    steps: int = 100  # optimiser steps
    seed: int = 0
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling: an update whose
    # gradients overflow is skipped and the scale halved, logged as `scale` / `overflows` in metrics.jsonl);
    # fp16 runs on GPUs and CPUs, but CPUs without AVX512-FP16 run fp16 matmuls in a slow fallback (debug
    # recipe steps ~4x slower than fp32 on a Zen 5 CPU): there fp16 is for testing, use bf16 to train
    label_smoothing: float = 0.0
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    compile: bool = False  # torch.compile the model
    keep_freed_memory: bool = True  # CPU runs on glibc: keep freed memory for reuse rather than returning it to
    # the OS, which spares 70-150k page faults per step of a 6x384 model (10-25% of it); the resident size stays
    # at its peak (lmforge/train/allocator.py)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    parallel: str = "ddp"  # under torchrun: ddp (whole model on every process) or fsdp (FSDP2, sharded)
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    matmul: str = "auto"  # auto (onednn for fp32 on the CPU, else aten), aten (F.linear) or onednn (CPU, fp32 /
    # bf16): every linear map (nn.Linear, tied LM head, MoE experts) forward + backward on oneDNN GEMMs; fp32 GEMMs
    # 2-3x faster on AMD CPUs (aten's MKL path lacks AVX-512), steps 1.5-1.7x (bench/train_throughput.py)


@dataclass
class EvalSection:
    every: int = 50  # steps between evaluations (and at the end)
    batches: int = 8  # validation batches (of batch.micro_batch sequences) per evaluation, shared by the processes


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
        if self.train.parallel not in PARALLEL:
            raise ValueError(f"train.parallel={self.train.parallel!r} is not supported; choose one of {PARALLEL}")
        if self.train.matmul not in MATMULS:
            raise ValueError(f"train.matmul={self.train.matmul!r} is not supported; choose one of {MATMULS}")
        if self.train.precision == "fp16" and self.train.matmul == "onednn":
            raise ValueError("train.matmul=onednn computes in fp32 or bf16, not in train.precision=fp16; "
                             "use train.matmul=aten (or auto) with fp16, or bf16 with onednn")
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
    node[leaf] = _yaml(raw)


def merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`: mappings merge key by key (recursively), any other value of child replaces base's."""
    out = dict(base)
    for key, value in child.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_recipe_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe file as plain data, with `extends: PARENT.yaml` resolved.

    `extends` names another recipe, relative to this file's folder; the parent is read first (itself
    possibly extending another) and this file's keys are merged over it with `merge`: sections and
    `model.overrides` merge key by key, lists and scalars are replaced (`data.inputs: [x]` replaces the
    parent's list). A tiny variant is then its big recipe plus the few keys that differ.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (extended by {_chain[-1]})" if _chain else ""
        raise FileNotFoundError(f"recipe {path}{where} does not exist; see recipes/ for examples")
    if path.resolve() in _chain:
        raise ValueError(f"recipe {path} extends itself: {' -> '.join(map(str, (*_chain, path.resolve())))}")
    data = _yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ValueError(f"recipe {path}: extends must be a recipe file name such as gpt2.yaml, got {parent!r}")
    return merge(read_recipe_file(path.parent / parent, (*_chain, path.resolve())), data)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (None: all defaults; `extends:` resolved) and apply `section.key=value` overrides."""
    data = read_recipe_file(path) if path is not None else {}
    return recipe_from_dict(data, overrides)


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from plain data (as YAML would give it) plus `section.key=value` overrides."""
    data = copy.deepcopy(data)
    for override in overrides:
        apply_override(data, override)
    return _build(Recipe, data, "")
