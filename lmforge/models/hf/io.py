"""Reading and writing Hugging Face checkpoint folders: config.json + safetensors (sharded or not).

Pickle-based `.bin` weights can run arbitrary code when loaded; they are refused unless the caller
opts in, and even then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge._files import new_file_mode, temp_path, write_text_atomic

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder or a .gguf file")
    return json.loads(path.read_text())


def _shard_files(folder: Path, index_name: str, single: str) -> list[Path]:
    index = folder / index_name
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / single] if (folder / single).is_file() else []


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    files = _shard_files(folder, SAFE_INDEX, "model.safetensors")
    if files:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        return state
    pickled = _shard_files(folder, BIN_INDEX, "pytorch_model.bin")
    if not pickled:
        raise FileNotFoundError(f"{folder} holds no model.safetensors, sharded safetensors or pytorch_model.bin")
    if not allow_pickle:
        raise ValueError(
            f"{folder} holds only pickle-based weights ({pickled[0].name}), which can execute code when loaded; "
            "convert them to safetensors, or pass allow_pickle=True to read them with torch.load(weights_only=True)"
        )
    state = {}
    for file in pickled:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def _atomic_write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = temp_path(path)
    try:
        mode = new_file_mode(tmp)
        save_file(tensors, tmp, metadata={"format": "pt"})  # safetensors writes 0600 files: give the usual mode
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_checkpoint(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors shards (one file when the state fits in a shard)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        _atomic_save_file(shards[0], folder / "model.safetensors")
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_file(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        _atomic_write_text(folder / SAFE_INDEX, json.dumps({"metadata": {"total_size": total},
                                                             "weight_map": weight_map}, indent=2))
    _atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
