"""Training recipes: one YAML file -> `Recipe`, every field documented here and reachable from the
command line as `--section.field=value` (values parsed as YAML: `--optim.lr=1e-3`,
`--model.overrides.n_layer=4`). A recipe may start with `extends: other.yaml` (relative to its own
folder) and give only what differs from that one; see `read_recipe_file`.

Every value is checked against its field's annotation when the recipe is built (`_coerce`): an int
field takes whole numbers (`1e3` is 1000, `1.5` an error), a float field any finite number, a bool
field true or false only, a choice (`Literal`) field one of its choices, a list of strings also one
string (`--data.inputs=prose`), `optim.betas` two numbers. The rules between fields (warmup within the
run, checkpoints at evaluations, whole micro-batches per step) are checked in `Recipe.__post_init__`,
and `check_model_fits` checks the model, objective and tokenizer against each other, so that a
mistake fails before a run folder is written or a tokenizer trained, under the keys the user wrote.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lmforge.train.optim import OptimConfig
from lmforge.train.schedule import ScheduleConfig


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, with two YAML 1.2 rules: `1e-3` is a float rather than the
    string YAML 1.1 makes of an exponent without a dot (which would only fail later as a comparison
    error), and only true / false are booleans: YAML 1.1's yes / no / on / off stay strings, so that
    `--train.compile=yes` is refused and `--data.inputs=no` names a corpus."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's writer, which also quotes the strings `_Loader` reads as floats (`1e3`)."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """YAML as recipes are read: plain data only, and yes / no / on / off stay strings (corpus names)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as YAML (a run folder's recipe.yaml), which `load_recipe` reads back to an equal recipe."""
    return yaml.dump(recipe.to_dict(), Dumper=_Dumper, sort_keys=False)


# The choice fields; the checks name their choices (`_coerce`).
ObjectiveName = Literal["clm", "mlm", "span", "seq2seq"]  # see lmforge.train.objectives
TokenizerKind = Literal["bpe", "wordpiece", "unigram"]  # see lmforge.tokenizer.train.KINDS
Precision = Literal["fp32", "bf16", "fp16", "auto"]
ParallelMode = Literal["ddp", "fsdp"]  # see lmforge.train.distributed
Matmul = Literal["auto", "aten", "onednn"]  # see lmforge.nn.packed.resolve_matmul
Device = Literal["auto", "cpu", "cuda"]  # see lmforge.train.distributed.Dist
OBJECTIVES, PRECISIONS, PARALLEL, MATMULS = (get_args(t) for t in (ObjectiveName, Precision, ParallelMode, Matmul))


@dataclass
class ModelSection:
    preset: str = "debug-llama"  # a name from `lmforge presets`
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields; vocab_size and the special
    # token ids (bos, eos, pad) come from the tokenizer


@dataclass
class TokenizerSection:
    path: str | None = None  # an existing tokenizer folder; None: train one on the data (cached)
    kind: TokenizerKind = "bpe"  # when training: bpe, wordpiece (has [MASK], for mlm) or unigram
    vocab_size: int = 4096  # every token, special ones and sentinels included
    sentinels: int = 0  # T5's <extra_id_0>, ... at the end of the vocabulary (span corruption needs them; T5: 100)
    max_chars: int | None = None  # train on the first documents up to this many characters (None: all)


@dataclass
class DataSection:
    inputs: list[str] = field(default_factory=lambda: ["python-code"])  # corpus names, files, folders, globs;
    # for seq2seq: pair corpora (translation-de, summaries), .jsonl with source/target, or .tsv files
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    val_fraction: float = 0.02  # documents held out for validation
    objective: ObjectiveName = "clm"  # clm (decoder), mlm (encoder), span (T5 corruption) or seq2seq (pairs):
    # see train/objectives.py
    document_attention: bool = False  # packed documents do not attend to each other


@dataclass
class BatchSection:
    seq_len: int = 128  # tokens per sequence; span: corrupted input length; seq2seq: max source and target length
    micro_batch: int = 8  # sequences per forward pass on each process
    global_batch: int = 8  # sequences per optimiser step over all processes (micro x accumulation x world)


@dataclass
class TrainSection:
    steps: int = 100  # optimiser steps
    seed: int = 0  # seeds the model initialisation, the train / validation split of the documents, the data order
    # and the objective's sampling (masks, spans); the same seed and recipe give the same losses
    precision: Precision = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling: an update whose
    # gradients overflow is skipped and the scale halved, logged as `scale` / `overflows` in metrics.jsonl);
    # fp16 runs on GPUs and CPUs, but CPUs without AVX512-FP16 run fp16 matmuls in a slow fallback (debug
    # recipe steps ~4x slower than fp32 on a Zen 5 CPU): there fp16 is for testing, use bf16 to train; auto: bf16
    # where the device computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32, and
    # the run's recipe.yaml records the choice (`lmforge.train.loop.resolve_precision`)
    label_smoothing: float = 0.0  # in [0, 1): the target puts 1 - eps on the label and eps / vocab on every token
    # (Szegedy et al. 2016 §7; the Transformer's 0.1); train losses include it, validation losses do not
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    compile: bool = False  # torch.compile the model
    keep_freed_memory: bool = True  # CPU runs on glibc: keep freed memory for reuse rather than returning it to
    # the OS, which spares 70-150k page faults per step of a 6x384 model (10-25% of it); the resident size stays
    # at its peak (lmforge/train/allocator.py)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    parallel: ParallelMode = "ddp"  # under torchrun: ddp (whole model on every process) or fsdp (FSDP2, sharded)
    device: Device = "auto"  # auto (cuda if available), cpu or cuda
    matmul: Matmul = "auto"  # auto (onednn for fp32 on the CPU, else aten), aten (F.linear) or onednn (CPU, fp32 /
    # bf16): every linear map (nn.Linear, tied LM head, MoE experts) forward + backward on oneDNN GEMMs; fp32 GEMMs
    # 2-3x faster on AMD CPUs (aten's MKL path lacks AVX-512), steps 1.5-1.7x (bench/train_throughput.py)


@dataclass
class EvalSection:
    every: int = 50  # steps between evaluations (and at the end)
    batches: int = 8  # validation batches (of batch.micro_batch sequences) per evaluation, shared by the processes


@dataclass
class CheckpointSection:
    every: int = 50  # steps between checkpoints (and at the end); a multiple of eval.every, so that every checkpoint
    # has a fresh validation loss to be ranked by (train.steps or more: one checkpoint, at the end)
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
        for section in dataclasses.fields(self):  # a Recipe built in Python is checked as one read from YAML
            _check_types(getattr(self, section.name), section.name)
        self._check_ranges()
        self._check_between_fields()

    def _check_ranges(self) -> None:
        for name in ("batch.seq_len", "batch.micro_batch", "batch.global_batch", "train.steps", "train.max_bad_steps",
                     "eval.every", "eval.batches", "checkpoint.every", "checkpoint.keep_last",
                     "data.tokenizer.vocab_size", "data.tokenizer.max_chars"):
            value = self._get(name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if self.data.tokenizer.sentinels < 0:
            raise ValueError(f"data.tokenizer.sentinels={self.data.tokenizer.sentinels} must be >= 0 (T5: 100)")
        if not self.data.inputs:
            raise ValueError("data.inputs is empty; name at least one corpus, file or folder, "
                             "e.g. --data.inputs=python-code (`lmforge data list` shows the corpora)")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.data.val_fraction} must lie strictly between 0 and 1: it is "
                             "the share of documents held out for validation (0.01-0.05 is common)")
        if not 0.0 <= self.train.label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing={self.train.label_smoothing} must lie in [0, 1): "
                             "0 is off, 0.1 is the Transformer's")

    def _check_between_fields(self) -> None:
        if self.train.precision == "fp16" and self.train.matmul == "onednn":
            raise ValueError("train.matmul=onednn computes in fp32 or bf16, not in train.precision=fp16; "
                             "use train.matmul=aten (or auto) with fp16, or bf16 with onednn")
        steps, warmup = self.train.steps, self.schedule.warmup_steps
        if warmup > steps:  # lr_factor refuses it too, but only at the first step, after the run folder is written
            raise ValueError(f"schedule.warmup_steps={warmup} exceeds train.steps={steps}: the warmup would not end "
                             f"within the run; lower it (e.g. --schedule.warmup_steps={steps // 10}) or train for "
                             f"at least as many steps (--train.steps={warmup})")
        micro, total = self.batch.micro_batch, self.batch.global_batch
        if total % micro:  # the loop adds the number of processes to this rule
            raise ValueError(f"batch.global_batch={total} must be a multiple of batch.micro_batch={micro}: an "
                             "optimiser step accumulates whole micro-batches; use e.g. "
                             f"--batch.global_batch={micro * max(1, round(total / micro))}")
        every, evals = self.checkpoint.every, self.eval.every
        # The loop evaluates at multiples of eval.every and checkpoints at multiples of checkpoint.every, both
        # also after the last step; a checkpoint before the last step must fall on an evaluation step to be
        # ranked by a fresh validation loss when the best one is kept.
        if every < steps and every % evals:
            raise ValueError(f"checkpoint.every={every} must be a multiple of eval.every={evals}, so that every "
                             "checkpoint has a fresh validation loss (the best one is kept by it); use e.g. "
                             f"--checkpoint.every={-(-every // evals) * evals} or --eval.every={every}")

    def _get(self, name: str) -> Any:
        node = self
        for part in name.split("."):
            node = getattr(node, part)
        return node

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, YAML-safe


# --- values against their annotations ----------------------------------------------------------------------------

# Examples for the fields whose default says nothing (None, an empty mapping); the others show their default.
_EXAMPLES = {"data.tokenizer.path": "--data.tokenizer.path=runs/demo/tokenizer",
             "data.tokenizer.max_chars": "--data.tokenizer.max_chars=1000000",
             "optim.fused": "--optim.fused=true", "model.overrides": "--model.overrides.n_layer=4"}
_KINDS = {bool: "true or false (bool)", int: "a whole number (int)", float: "a finite number (float)",
          str: "a string (str)"}


class _Mismatch(Exception):
    """A value that does not fit its annotation (reported with the key by `_field`)."""


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` asks for, or _Mismatch. Whole floats become ints (YAML reads `1e3` as a float),
    ints become floats, one string becomes a list of one, lists become tuples."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # the recipe's unions are `X | None`
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # True is an int to Python
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if number and math.isfinite(value) and value == int(value):
            return int(value)
    elif hint is float:
        if number and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str) and args == (str,):
            value = [value]  # one corpus: --data.inputs=prose
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0]) for v in value]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
    else:
        raise TypeError(f"recipe annotation {hint!r} is not handled by _coerce; add it there")
    raise _Mismatch


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in args)
    if origin is list:
        return "a list of strings (or one string)" if args == (str,) else f"a list of {_describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {'numbers' if set(args) == {float} else 'values'}"
    if origin is dict:
        return "a mapping of names to values"
    return _KINDS.get(hint, repr(hint))


def _show(value: Any) -> str:
    """A value as it is written after `--key=` (YAML flow style)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _field(value: Any, hint: Any, key: str, default: Any) -> Any:
    """`_coerce` with a ValueError that names the key as the user writes it, the value, the type and an example."""
    try:
        return _coerce(value, hint)
    except _Mismatch:
        pass
    example = _EXAMPLES.get(key, f"--{key}={_show(default)}")
    shown = _show(value) if isinstance(value, bool) or value is None else repr(value)
    if get_origin(hint) is Literal:
        raise ValueError(f"{key}={shown} is not supported; choose one of {get_args(hint)}, e.g. {example}")
    raise ValueError(f"{key}={shown} is not {_describe(hint)}; e.g. {example}")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check_types(obj: Any, where: str) -> None:
    """Each field of the dataclass `obj` (recursively) through `_field`, the converted value stored back."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        key, value = f"{where}.{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            _check_types(value, key)
        else:
            setattr(obj, f.name, _field(value, hints[f.name], key, _default(f)))


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a nested dict, refusing unknown keys with the list of valid ones and checking each value
    (before the dataclass's own checks compare it with anything)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if data is None and where:
        data = {}  # a section left empty in YAML (`eval:` with its keys commented out)
    if not isinstance(data, dict):
        what = f"{where}={data!r} is not a section" if where else f"a recipe must be a mapping, got {data!r}"
        first = next(iter(fields.values()))
        raise ValueError(f"{what}: expected a mapping of its keys {sorted(fields)}, e.g. "
                         f"--{where + '.' if where else ''}{first.name}={_show(_default(first))}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown recipe key(s) {[f'{prefix}{k}' for k in unknown]}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key)
        else:
            kwargs[name] = _field(value, hints[name], key, _default(fields[name]))
    try:
        return cls(**kwargs)
    except ValueError as err:  # OptimConfig's and ScheduleConfig's own checks, which do not know the section's name
        if not where or f"{where}." in str(err):
            raise
        raise ValueError(f"{where}: {err}") from err


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
    node[leaf] = read_yaml(raw)


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
    data = read_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ValueError(f"recipe {path}: extends must be a recipe file name such as gpt2.yaml, got {parent!r}")
    return merge(read_recipe_file(path.parent / parent, (*_chain, path.resolve())), data)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (None: all defaults; `extends:` resolved), apply `section.key=value` overrides and
    check that its model fits its objective and tokenizer (`check_model_fits`)."""
    data = read_recipe_file(path) if path is not None else {}
    recipe = recipe_from_dict(data, overrides)
    check_model_fits(recipe)
    return recipe


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from plain data (as YAML would give it) plus `section.key=value` overrides."""
    data = copy.deepcopy(data)
    for override in overrides:
        apply_override(data, override)
    return _build(Recipe, data, "")


def check_model_fits(recipe: Recipe) -> None:
    """Raise ValueError unless the recipe's model, objective and tokenizer go together: the preset exists and
    takes model.overrides, it is of the family data.objective trains, a learned position table holds
    batch.seq_len positions, and a tokenizer trained for the run will have the tokens the objective needs.

    The run finds each of these itself, but only after training the tokenizer and preparing the data. Not part
    of `Recipe.__post_init__`: a recipe also carries data settings for one stage alone (tests build an mlm
    recipe with the default decoder preset to exercise the batcher). With data.tokenizer.path, vocab_size is
    the recipe's, not that tokenizer's; it only bounds a model.overrides.decoder_start_token_id.
    """
    from lmforge.config import ModelConfig
    from lmforge.train.objectives import get_objective  # imports this module: here, not at the top

    model, data = recipe.model, recipe.data
    try:
        cfg = ModelConfig.from_preset(model.preset, **{**model.overrides, "vocab_size": data.tokenizer.vocab_size})
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.preset={model.preset!r} with model.overrides={model.overrides}: {err}") from err
    get_objective(data.objective).check(cfg, data)
    limit, seq_len = cfg.position.max_seq_len, recipe.batch.seq_len
    if cfg.position.kind == "learned" and seq_len > limit:
        raise ValueError(f"batch.seq_len={seq_len} exceeds the {limit} positions of the learned position table of "
                         f"model.preset={model.preset!r}; lower it (--batch.seq_len={limit}) or give the model more "
                         f"positions (--model.overrides.position.max_seq_len={seq_len})")
    if data.tokenizer.path is None and data.objective == "mlm" and data.tokenizer.kind != "wordpiece":
        raise ValueError(f"data.objective=mlm needs a mask token, which of the trained tokenizers only "
                         f"data.tokenizer.kind=wordpiece has ([MASK]), not {data.tokenizer.kind!r}; set "
                         "--data.tokenizer.kind=wordpiece, or data.tokenizer.path to a tokenizer with a mask token")
    if data.tokenizer.path is None and data.objective == "span" and data.tokenizer.sentinels == 0:
        raise ValueError("data.objective=span needs sentinel tokens <extra_id_0>, ... in the tokenizer; set "
                         "--data.tokenizer.sentinels=100 (T5's number)")
