"""The run folder (`--out RUN_DIR`) outside its checkpoints: what `--fresh --overwrite` may delete, the
lock that keeps a second run out of a folder in use, and what a resumed run may change in the recipe.

A run folder is recognised by `run.json` or `checkpoints/` (both written by `lmforge train`); anything
else is left alone, so a mistyped `--out` cannot wipe a folder of other files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lmforge._files import FileLock, LockHeld
from lmforge.train.recipe import Recipe, merge, read_yaml, recipe_yaml

LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.yaml"
RUN_MARKERS = ("run.json", "checkpoints")
# What the checkpoints and the data order are made of: a resumed run must keep these. The rest (steps,
# optimiser and schedule settings, eval / checkpoint cadence, precision, matmul, compile, device, parallel,
# ...) may change on resume; the change is logged and recorded in recipe.yaml. batch.micro_batch may
# change too: with the same global batch it only splits a step differently (the loader converts its
# position), which is how a run resumes under another number of processes (tests/train/test_distributed.py).
FROZEN = ("model", "data", "batch.seq_len", "batch.global_batch", "train.seed")


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder's lock."""

    exit_code = 1  # the CLI reports it without a traceback


def _contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)


def _some(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def looks_like_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def check_flags(fresh: bool, overwrite: bool) -> None:
    if overwrite and not fresh:
        raise ValueError("--overwrite only confirms --fresh (start over, deleting the run folder); add --fresh "
                         "to start over, or leave out --overwrite to resume the run")


def _check_fresh(out: Path, overwrite: bool) -> None:
    """Raise unless `out` may be emptied for a fresh run."""
    names = _contents(out)
    if not names:
        return
    if not looks_like_run(out):
        raise ValueError(f"--fresh: {out} is not an lmforge run folder (it has no run.json or checkpoints/) and "
                         f"holds {_some(names)}; it is never deleted. Choose another --out: a new or empty folder")
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"--fresh --overwrite would delete {out}, which holds the current directory {cwd}; "
                         "run from another directory, or pass another --out")
    if not overwrite:
        raise ValueError(f"--fresh: {out} is not empty (it holds {_some(names)}) and would be deleted; pass "
                         "--overwrite as well to confirm, or choose another --out")


def _empty(out: Path) -> None:
    """Delete everything in `out` but the lock file (held by this process: deleting it would let a
    second run lock a new file of the same name)."""
    for child in out.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class RunLock(FileLock):
    """RUN_DIR/.lock (`lmforge._files.FileLock`), held for the life of a run by rank 0: a second run on the
    folder fails at once, naming the process that trains in it. A SIGKILL-ed run's lock never blocks a resume."""

    def __init__(self, folder: Path) -> None:
        try:
            super().__init__(folder / LOCK_FILE)
        except LockHeld as held:
            raise RunFolderInUse(f"{folder} is in use: {held.holder} is training in it (lock file "
                                 f"{folder / LOCK_FILE}). Wait for that run to end or stop it, or choose another "
                                 "--out") from None


def prepare_run_dir(out: Path, fresh: bool, overwrite: bool) -> RunLock:
    """Create and lock `out` for this run; with `fresh`, empty it first (only a run folder; see
    `check_flags` and `_check_fresh`). Call on rank 0; release the returned lock when the run ends."""
    check_flags(fresh, overwrite)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the run folder must be a folder (new or a previous run's)")
    if fresh and out.exists():
        _check_fresh(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    if fresh:
        _empty(out)
    return lock


# --- resuming with another recipe ---------------------------------------------------------------------

_UNSET = "(unset)"


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 0.003, "model.overrides.d_model": 64, ...}: mappings flattened, other values kept."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _frozen(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FROZEN)


def recipe_changes(old: dict[str, Any], new: Recipe) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for each field that differs. `old` (a run's recipe.yaml) is read over
    the defaults, so a field added to the recipe since that run was written is not a change."""
    before = _leaves(merge(Recipe().to_dict(), old))
    after = _leaves(new.to_dict())
    return [(key, before.get(key, _UNSET), after.get(key, _UNSET)) for key in [*before, *after.keys() - before.keys()]
            if before.get(key, _UNSET) != after.get(key, _UNSET)]


def check_resume(out: Path, recipe: Recipe) -> list[tuple[str, Any, Any]]:
    """The allowed changes of `recipe` from the recipe RUN_DIR/recipe.yaml was written with; raises
    ValueError naming every change of a FROZEN field (the checkpoints were trained with the old values).
    A run folder without recipe.yaml has nothing to compare: no changes."""
    path = out / RECIPE_FILE
    if not path.is_file():
        return []
    old = read_yaml(path.read_text()) or {}
    changes = recipe_changes(old, recipe)
    refused = [c for c in changes if _frozen(c[0])]
    if refused:
        raise ValueError(
            f"cannot resume {out} with a different {', '.join(dict.fromkeys(k.split('.')[0] for k, _, _ in refused))}: "
            f"{_describe(refused)}. Its checkpoints were made with the old values ({path}); resume with those, or "
            "start over: --fresh --overwrite (deletes this run) or another --out")
    return changes


def _describe(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old} -> {new}" for key, old, new in changes)


def record_resume(out: Path, recipe: Recipe, changes: list[tuple[str, Any, Any]], step: int, log) -> None:
    """Log the allowed changes and make RUN_DIR/recipe.yaml the new recipe, the previous one kept as
    recipe-step<step>.yaml (the recipe of the steps up to `step`; when that file exists already, a
    previous resume from the same step wrote it, and it is kept: the steps after it were not)."""
    if not changes:
        return
    path = out / RECIPE_FILE
    kept = out / f"recipe-step{step}.yaml"
    if path.exists() and not kept.exists():
        os.replace(path, kept)
    write_recipe(out, recipe)
    log(f"resuming with changed settings: {_describe(changes)} (recipe.yaml updated; the recipe up to step "
        f"{step} is {kept.name})")


def write_recipe(out: Path, recipe: Recipe) -> None:
    """RUN_DIR/recipe.yaml, written as `run_info.write_run_info` writes it, atomically."""
    tmp = out / f"{RECIPE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(recipe_yaml(recipe))
    os.replace(tmp, out / RECIPE_FILE)
