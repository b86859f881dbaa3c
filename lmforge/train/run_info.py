"""What a run folder records about how it was made: the resolved recipe, the model config, seed,
package versions, the code (git commit, and whether tracked files had uncommitted changes) and the
data (tokenizer fingerprint; the prepared shards' index hash, per-file sha256 and token counts), so
two runs can be told to have trained on the same bytes with the same code."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from lmforge.config import ModelConfig
from lmforge.data.shard_io import INDEX, read_index
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import get_objective
from lmforge.train.recipe import Recipe, recipe_yaml

PACKAGES = ("lmforge", "torch", "numpy", "tokenizers", "safetensors")
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(folder: Path, *args: str) -> str | None:
    """`git args` run in `folder`: its stdout, or None when git is missing, fails or hangs."""
    try:
        out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(folder: Path = PACKAGE_DIR) -> dict[str, Any]:
    """{"commit": HEAD's sha, "dirty": whether tracked files differ from HEAD} of the checkout that holds
    `folder` (default: the lmforge package); both None when `folder` is not tracked in a git checkout
    (an installed wheel, or a package folder inside some other repository that does not track it).
    Untracked files do not make a checkout dirty: only changes to files HEAD has can change the code."""
    unknown = {"commit": None, "dirty": None}
    if _git(folder, "ls-files", "--error-unmatch", ".") is None:  # not a repository, or not tracked in it
        return unknown
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return unknown
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def data_fingerprint(folder: Path) -> dict[str, Any]:
    """What a prepared folder (token shards or pairs) holds, from its index.json: the index's sha256,
    and per split its token and document counts and the sha256 of each of its files (shards, document
    offsets, labels). Equal fingerprints mean equal bytes; the loaders verify files against them."""
    folder = Path(folder)
    index = read_index(folder)
    splits = {}
    for name, entry in index["splits"].items():
        files = [*entry["shards"], entry["documents"], *([entry["labels"]] if "labels" in entry else [])]
        splits[name] = {"n_tokens": entry["n_tokens"], "n_documents": entry["n_documents"],
                        "sha256": {f["file"]: f["sha256"] for f in files}}
    return {"folder": str(folder), "kind": index["kind"],
            "index_sha256": hashlib.sha256((folder / INDEX).read_bytes()).hexdigest(), "splits": splits}


def write_run_info(out: Path, recipe: Recipe, cfg: ModelConfig, tokenizer: Tokenizer,
                   data: Path | None = None) -> None:
    """recipe.yaml and run.json in `out`. data: the prepared folder the run reads (default: the recipe's
    cached one, as its objective prepares it; already built by then, so this only looks it up)."""
    if data is None:
        data = get_objective(recipe.data.objective).prepare(recipe.data, tokenizer, recipe.train.seed,
                                                            log=lambda message: None)
    (out / "recipe.yaml").write_text(recipe_yaml(recipe))
    git = git_state()
    info = {"seed": recipe.train.seed, "model_config": cfg.to_dict(), "versions": versions(),
            "git_commit": git["commit"], "git_dirty": git["dirty"], "tokenizer_fingerprint": tokenizer.fingerprint,
            "data_inputs": recipe.data.inputs, "data": data_fingerprint(data)}
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
