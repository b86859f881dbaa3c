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
        SHA256SUMS             the sha256 of every file above (`sha256sum -c SHA256SUMS` checks them by hand)

Atomicity: a checkpoint is written into `step-XXXXXXXX.tmp-<pid>/`, every file and the folder are
fsynced, and the folder is renamed to its final name (`os.replace`, atomic on POSIX); the rename is
the completeness marker. Only then are `latest` and `index.json` rewritten (each atomically) and
old checkpoints pruned (renamed to `.del-<pid>` before deletion, so a half-deleted folder never
carries a real name). A crash at any point leaves every earlier complete checkpoint in place;
`latest_checkpoint` scans the folder names rather than trusting `latest`, and the next save
removes leftover `.tmp-*` / `.del-*` folders.

Integrity: `latest_checkpoint` returns the newest checkpoint whose files are all present, parse
(JSON; safetensors headers and lengths) and match their SHA256SUMS; a newer one that fails is skipped
with a warning naming it and what failed, and when none passes it raises ValueError with the fix.
`load_checkpoint` runs the same checks on the files it reads, and turns any read error into a
ValueError naming the folder and the file. Checkpoints written before SHA256SUMS existed (format
version 1) still load, with the cheap checks only.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge._files import pid_alive
from lmforge.data.shard_io import sha256_file

FORMAT = "lmforge-checkpoint"
VERSION = 2  # 2 added SHA256SUMS; version 1 checkpoints (no checksums) still load
_READABLE_VERSIONS = (1, 2)
MODEL, OPTIMIZER, OPTIMIZER_JSON = "model.safetensors", "optimizer.safetensors", "optimizer.json"
RNG, RNG_JSON, STATE, SUMS = "rng.safetensors", "rng.json", "state.json", "SHA256SUMS"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_SUMS_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)$")  # sha256sum's text format
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
    """The newest checkpoint under `run_dir/checkpoints` that is complete and verifies, or None if there is none.

    "Verifies": every file is present, parses, and matches its sha256 in SHA256SUMS. A newer checkpoint
    that fails is skipped with a warning naming it, what failed and the checkpoint used instead; when
    every checkpoint fails, ValueError lists them with the fix.
    """
    root = Path(run_dir) / "checkpoints"
    damaged = []
    for step, folder in reversed(_step_folders(root)):
        try:
            meta = _read_meta(folder)
            _check_files(folder, meta, _files(meta), verify=True)
        except _Damaged as e:
            damaged.append((folder, str(e)))
            continue
        for bad, why in damaged:
            warnings.warn(f"skipping damaged checkpoint {bad}: {why}. Using the previous checkpoint {folder.name} "
                          f"(step {step}) instead. Delete {bad} (or restore its files) to silence this warning",
                          stacklevel=2)
        return folder
    if damaged:
        listed = "\n".join(f"  {bad}: {why}" for bad, why in damaged)
        raise ValueError(f"no checkpoint under {root} can be loaded:\n{listed}\nrestore the damaged files from a "
                         f"backup, or start the run over with `--fresh --overwrite` (this deletes {Path(run_dir)})")
    return None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest finite metric (the later one on ties), or None."""
    return _best(_complete(Path(run_dir) / "checkpoints"))


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True, map_location: str | torch.device = "cpu", verify: bool = True) -> dict:
    """Load weights (strict), optimiser state and RNG states from `path`; return the saved `state` dict.

    Every file is read and checked (with `verify`, against its sha256 too) before anything is
    applied; a damaged checkpoint raises ValueError naming the folder and the file. `verify=False`
    skips only the hashing, for a folder `latest_checkpoint` has just verified.
    """
    path = Path(path)
    device = str(map_location)
    try:
        meta = _read_meta(path)
        if optimizer is not None and not meta["optimizer"]:
            raise ValueError(f"checkpoint {path} holds no optimizer state; pass optimizer=None to load weights only")
        _check_files(path, meta, _files(meta, optimizer=optimizer is not None, rng=restore_rng), verify)
        weights = _load_tensors(path, MODEL, device)
        optimizer_state = None if optimizer is None else _optimizer_state(path, device)
        rng = _rng_states(_load_tensors(path, RNG, "cpu"), _load_json(path, RNG_JSON)) if restore_rng else None
    except _Damaged as e:
        raise ValueError(f"cannot load checkpoint {path}: {e}; restore the files from a backup or load an earlier "
                         f"checkpoint (latest_checkpoint(run_dir) skips damaged ones)") from None
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing keys {missing}, unexpected keys "
                         f"{unexpected}; build the model from the run's recipe before loading")
    model.load_state_dict(weights, strict=True)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if rng is not None:
        _set_rng(*rng)
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
    # safetensors writes through a 0600 temporary file; give every file the mode a plain open() gives,
    # 0666 & ~umask, read off the folder mkdir just made (0777 & ~umask) rather than by setting the
    # process-wide umask, which another thread could create a file under meanwhile
    mode = folder.stat().st_mode & 0o666
    names = sorted(f.name for f in folder.iterdir())
    for name in names:
        os.chmod(folder / name, mode)
    (folder / SUMS).write_text("".join(f"{sha256_file(folder / name)}  {name}\n" for name in names))
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
        if m and (int(m.group(3)) == os.getpid() or not pid_alive(int(m.group(3)))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


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


class _Damaged(Exception):
    """What is wrong with a checkpoint folder, in words (missing file, parse error, checksum mismatch)."""


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-XXXXXXXX` folder under `root`, oldest first, checked or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda f: f[0])


def _read_meta(folder: Path) -> dict:
    """state.json of a checkpoint folder after the cheap checks: the files it names are present and
    state.json is ours and matches the folder. Raises _Damaged saying what is wrong."""
    m = _STEP_DIR.match(folder.name)
    if m is None:
        raise _Damaged("not a step-XXXXXXXX checkpoint folder; pass a folder from latest_checkpoint(run_dir)")
    missing = [f for f in (MODEL, STATE, RNG, RNG_JSON) if not (folder / f).is_file()]
    if missing:
        raise _Damaged(f"not a complete checkpoint, {', '.join(missing)} missing")
    meta = _load_json(folder, STATE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _Damaged(f"{STATE} is not an lmforge checkpoint's (format {found!r}, expected {FORMAT!r})")
    if meta.get("version") not in _READABLE_VERSIONS:
        raise _Damaged(f"{STATE} has format version {meta.get('version')!r}, this lmforge reads versions "
                       f"{list(_READABLE_VERSIONS)}; load it with the lmforge that wrote it (or a newer one)")
    if meta.get("step") != int(m.group(1)):
        raise _Damaged(f"{STATE} says step {meta.get('step')!r}, the folder name says {int(m.group(1))}")
    absent = sorted({"metric", "optimizer", "state"} - set(meta))
    if absent:
        raise _Damaged(f"{STATE} lacks the key(s) {absent}")
    missing = [f for f in _files(meta) if not (folder / f).is_file()]
    if meta["version"] >= 2 and not (folder / SUMS).is_file():
        missing.append(SUMS)
    if missing:
        raise _Damaged(f"not a complete checkpoint, {', '.join(missing)} missing")
    return meta


def _files(meta: dict, optimizer: bool = True, rng: bool = True) -> list[str]:
    """The files a load reads: the weights and state.json, plus the optimiser's and the RNG's if asked."""
    names = [MODEL, STATE]
    if optimizer and meta["optimizer"]:
        names += [OPTIMIZER, OPTIMIZER_JSON]
    if rng:
        names += [RNG, RNG_JSON]
    return names


def _check_files(folder: Path, meta: dict, names: list[str], verify: bool) -> None:
    """Cheap checks first (safetensors lengths match their headers, JSON parses: they name what is wrong
    better than a checksum does), then with `verify` the sha256 of each file against SHA256SUMS
    (version 2 on; version 1 checkpoints have no checksums). Raises _Damaged."""
    for name in names:
        if name.endswith(".safetensors"):
            _check_safetensors(folder / name)
        elif name != STATE:  # state.json was parsed by _read_meta
            _load_json(folder, name)
    if not verify or meta["version"] < 2:
        return
    sums = _read_sums(folder)
    for name in names:
        if name not in sums:
            raise _Damaged(f"{SUMS} has no checksum for {name}")
        if (found := sha256_file(folder / name)) != sums[name]:
            raise _Damaged(f"{name} has sha256 {found}, {SUMS} records {sums[name]}: the file was damaged or "
                           f"changed after the save")


def _check_safetensors(path: Path) -> None:
    """The file holds an 8-byte header length, a JSON header, and exactly the bytes that header lays out
    (a truncated or padded file fails here without reading the tensors)."""
    size = path.stat().st_size
    if size < 8:
        raise _Damaged(f"{path.name} is truncated ({size} bytes, not even a header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise _Damaged(f"{path.name} is truncated or damaged ({size} bytes, its header length field says "
                           f"{n} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if not isinstance(end, int):
                raise TypeError(f"data offset {end!r} is not an integer")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise _Damaged(f"{path.name} has an unreadable safetensors header ({e!r})") from None
    if size < 8 + n + end:
        raise _Damaged(f"{path.name} is truncated ({size} bytes, its header lays out {8 + n + end})")
    if size > 8 + n + end:
        raise _Damaged(f"{path.name} is damaged ({size} bytes, its header lays out only {8 + n + end})")


def _read_sums(folder: Path) -> dict[str, str]:
    try:
        lines = (folder / SUMS).read_text().splitlines()
    except (OSError, ValueError) as e:
        raise _Damaged(f"{SUMS} cannot be read ({e})") from None
    sums = {}
    for i, line in enumerate(lines, start=1):
        if (m := _SUMS_LINE.match(line)) is None:
            raise _Damaged(f"{SUMS} line {i} is not '<sha256>  <file name>': {line[:80]!r}")
        sums[m.group(2)] = m.group(1)
    return sums


def _load_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError) as e:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise _Damaged(f"{name} is not readable JSON ({e})") from None


def _load_tensors(folder: Path, name: str, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(folder / name, device=device)
    except (SafetensorError, OSError) as e:
        raise _Damaged(f"{name} cannot be read ({e})") from None


def _optimizer_state(folder: Path, device: str) -> dict:
    tensors = _load_tensors(folder, OPTIMIZER, device)
    try:
        return _from_json(_load_json(folder, OPTIMIZER_JSON), tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise _Damaged(f"{OPTIMIZER_JSON} does not fit {OPTIMIZER} ({e!r})") from None


def _complete(root: Path) -> list[tuple[int, Path, dict]]:
    """(step, folder, state.json) of every checkpoint under `root` that passes the cheap checks, oldest first."""
    found = []
    for step, folder in _step_folders(root):
        try:
            found.append((step, folder, _read_meta(folder)))
        except _Damaged:
            pass
    return found


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


def _rng_states(tensors: dict[str, torch.Tensor], states: dict) -> tuple:
    """The saved generator states in the form the setters take, so a malformed rng.json fails before
    anything is applied."""
    try:
        n, p = states["numpy"], states["python"]
        return (tensors["torch_cpu"], tensors.get("torch_cuda"),
                (n["bit_generator"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                 n["cached_gaussian"]),
                (p["version"], tuple(p["state"]), p["gauss_next"]))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise _Damaged(f"{RNG_JSON} / {RNG} do not hold generator states ({e!r})") from None


def _set_rng(torch_cpu: torch.Tensor, torch_cuda: torch.Tensor | None, numpy_state: tuple,
             python_state: tuple) -> None:
    torch.set_rng_state(torch_cpu)
    if torch_cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch_cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
