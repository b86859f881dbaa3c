"""What a run folder records about how it was made: the resolved recipe, the model config, seed,
package versions, git commit and data fingerprint."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from lmforge.config import ModelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.recipe import Recipe

PACKAGES = ("lmforge", "torch", "numpy", "tokenizers", "safetensors")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_run_info(out: Path, recipe: Recipe, cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    info = {"seed": recipe.train.seed, "model_config": cfg.to_dict(), "versions": versions(),
            "git_commit": git_commit(), "tokenizer_fingerprint": tokenizer.fingerprint,
            "data_inputs": recipe.data.inputs}
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
