"""Training checkpoints: weights, optimiser, RNG and loop state, written atomically, loaded without pickle.

Layout of a run directory:

    RUN_DIR/checkpoints/
      latest                 name of the newest checkpoint, one line (for people and tools)
      index.json             kept checkpoints with their step and metric, the latest and the best
      step-00000100/
        model.safetensors      model.state_dict()
        optimizer.safetensors  the optimiser's tensors, keyed `state/<param index>/<name>`
        optimizer.json         the rest of optimizer.state_dict() (param_groups, non-tensor state)
        rng.safetensors        torch CPU (and current CUDA device) generator states, uint8
        rng.json               numpy's and Python's global generator states
        state.json             the caller's dict (step, scheduler, loader, guard, ...) plus the metric

Atomicity: a checkpoint is written into `step-XXXXXXXX.tmp-<pid>/`, every file and the folder are
fsynced, and the folder is renamed to its final name (`os.replace`, atomic on POSIX); the rename is
the completeness marker. Only then are `latest` and `index.json` rewritten (each atomically) and
old checkpoints pruned (renamed to `.del-<pid>` before deletion, so a half-deleted folder never
carries a real name). A crash at any point leaves every earlier complete checkpoint in place;
`latest_checkpoint` scans the folder names rather than trusting `latest`, and the next save
removes leftover `.tmp-*` / `.del-*` folders.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "lmforge-checkpoint"
VERSION = 1
MODEL, OPTIMIZER, OPTIMIZER_JSON = "model.safetensors", "optimizer.safetensors", "optimizer.json"
RNG, RNG_JSON, STATE = "rng.safetensors", "rng.json", "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# what an interrupted save or prune leaves behind: `<name>.tmp-<pid>` or `<name>.del-<pid>`
_LEFTOVER = re.compile(r"^(step-\d{8}|latest|index\.json)\.(tmp|del)-(\d+)$")


# --- public API -------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, metric: float | None = None, keep_last: int = 3) -> Path:
    """Write `run_dir/checkpoints/step-{step:08d}/` atomically, then prune; returns its path.

    Keeps the `keep_last` newest checkpoints by step plus the best by `metric` (lower is better).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the checkpoint just written is kept), got {keep_last}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"step-{step:08d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, step, model, optimizer, state, metric)
        _fsync(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside
            _discard(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text(root / "latest", final.name + "\n")
    _prune(root, keep_last)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under `run_dir/checkpoints`, or None."""
    found = _complete(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest finite metric (the later one on ties), or None."""
    return _best(_complete(Path(run_dir) / "checkpoints"))


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True, map_location: str | torch.device = "cpu") -> dict:
    """Load weights (strict), optimiser state and RNG states from `path`; return the saved `state` dict."""
    path = Path(path)
    meta = _read_meta(path)
    if meta is None:
        raise ValueError(f"{path} is not a complete lmforge checkpoint (expected a step-XXXXXXXX folder with "
                         f"{MODEL}, {STATE}, {RNG}, {RNG_JSON}); pass a folder from latest_checkpoint(run_dir)")
    device = str(map_location)
    weights = load_file(path / MODEL, device=device)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing keys {missing}, unexpected keys "
                         f"{unexpected}; build the model from the run's recipe before loading")
    model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        if not meta["optimizer"]:
            raise ValueError(f"checkpoint {path} holds no optimizer state; pass optimizer=None to load weights only")
        tensors = load_file(path / OPTIMIZER, device=device)
        optimizer.load_state_dict(_from_json(json.loads((path / OPTIMIZER_JSON).read_text()), tensors))
    if restore_rng:
        _set_rng(load_file(path / RNG), json.loads((path / RNG_JSON).read_text()))
    return meta["state"]


# --- writing ----------------------------------------------------------------------------------


def _write_files(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 state: dict, metric: float | None) -> None:
    save_file(_for_safetensors(model.state_dict()), folder / MODEL, metadata={"format": "pt"})
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        rest = _to_json(optimizer.state_dict(), "", tensors)
        save_file(_for_safetensors(tensors), folder / OPTIMIZER)
        _write_json(folder / OPTIMIZER_JSON, rest)
    rng_tensors, rng_json = _get_rng()
    save_file(rng_tensors, folder / RNG)
    _write_json(folder / RNG_JSON, rng_json)
    meta = {"format": FORMAT, "version": VERSION, "step": step, "metric": None if metric is None else float(metric),
            "optimizer": optimizer is not None, "state": state}
    try:
        _write_json(folder / STATE, meta)
    except TypeError as e:  # json names the type but not where it sits
        raise TypeError(f"state for step {step} must be JSON-serialisable (dicts, lists, str, numbers, "
                        f"bools, None): {e}; convert tensors/arrays with .tolist() or .item()") from e
    for f in folder.iterdir():
        _fsync(f)


def _for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors, none sharing storage with another (safetensors refuses shared
    storage, e.g. a tied embedding and head): a tensor whose storage was already seen, or that covers
    only part of its storage, is cloned."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _write_text(path: Path, text: str) -> None:
    """Write `path` via a temporary file, fsync and rename, so readers never see half a file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(folder: Path) -> None:
    """Rename then delete, so a crash mid-delete leaves a leftover name, not a broken checkpoint."""
    trash = folder.with_name(f"{folder.name}.del-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Delete `.tmp-<pid>` / `.del-<pid>` leftovers of this process or of processes no longer alive
    (a live one may be another process saving into the same run right now)."""
    for p in root.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and (int(m.group(3)) == os.getpid() or not _alive(int(m.group(3)))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune(root: Path, keep_last: int) -> None:
    found = _complete(root)
    keep = {p for _, p, _ in found[-keep_last:]}
    best = _best(found)
    if best is not None:
        keep.add(best)
    for _, p, _ in found:
        if p not in keep:
            _discard(p)
    kept = [(s, p, meta) for s, p, meta in found if p in keep]
    index = {"checkpoints": [{"step": s, "path": p.name, "metric": meta["metric"]} for s, p, meta in kept],
             "latest": kept[-1][1].name if kept else None, "best": best.name if best else None}
    _write_text(root / "index.json", json.dumps(index, indent=1) + "\n")


# --- reading ----------------------------------------------------------------------------------


def _read_meta(folder: Path) -> dict | None:
    """state.json of a complete checkpoint folder, or None when a required file is missing or unreadable."""
    m = _STEP_DIR.match(folder.name)
    if m is None or not all((folder / f).is_file() for f in (MODEL, STATE, RNG, RNG_JSON)):
        return None
    try:
        meta = json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("step") != int(m.group(1)):
        return None
    if meta["optimizer"] and not ((folder / OPTIMIZER).is_file() and (folder / OPTIMIZER_JSON).is_file()):
        return None
    return meta


def _complete(root: Path) -> list[tuple[int, Path, dict]]:
    """(step, folder, state.json) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p, _read_meta(p)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(((s, p, meta) for s, p, meta in found if meta is not None), key=lambda f: f[0])


def _best(found: list[tuple[int, Path, dict]]) -> Path | None:
    scored = [(meta["metric"], -s, p) for s, p, meta in found
              if meta["metric"] is not None and math.isfinite(meta["metric"])]
    return min(scored)[2] if scored else None


# --- JSON without pickle: tensors become references into a safetensors file ---------------------


def _to_json(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of `obj`; each tensor is stored in `tensors` under its path (`state/0/exp_avg`)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):  # keys may be ints (optimizer state is keyed by parameter index)
        return {"__items__": [[k, _to_json(v, f"{key}/{k}".lstrip("/"), tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key!r} in an optimizer checkpoint: "
                    f"only tensors, tuples, lists, dicts, numbers, strings and None are supported")


def _from_json(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_from_json(v, tensors) for v in obj["__tuple__"])
        return {k: _from_json(v, tensors) for k, v in obj["__items__"]}
    return obj


# --- RNG --------------------------------------------------------------------------------------


def _get_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Generator states: torch CPU and the current CUDA device as uint8 tensors; numpy and Python as JSON.
    Only the current CUDA device: reading all devices would create a context on each from every rank."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {
        "numpy": {"bit_generator": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def _set_rng(tensors: dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    n = states["numpy"]
    np.random.set_state((n["bit_generator"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
