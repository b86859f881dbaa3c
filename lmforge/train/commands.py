"""Train models from YAML recipes and export the result."""

from __future__ import annotations

from pathlib import Path


def train_cmd(recipe: Path, out: Path | None = None, fresh: bool = False, overwrite: bool = False,
              overrides: list[str] | None = None) -> None:
    """Train a model from a YAML recipe, or resume it: running again with the same --out continues
    from its latest checkpoint. Any recipe field can be overridden as --section.key=value.

    Under torchrun (`torchrun --nproc-per-node N -m lmforge train ...`) the same recipe runs
    data-parallel on N processes.

    Args:
        recipe: YAML recipe file (see recipes/).
        out: run folder for checkpoints, metrics.jsonl, loss.png and the tokenizer (required).
        fresh: start over instead of resuming; refuses a non-empty folder unless --overwrite is given too.
        overwrite: with --fresh, delete the existing run folder first.
        overrides: section.key=value pairs, normally written directly as --section.key=value.
    """
    from lmforge.train.loop import train
    from lmforge.train.recipe import load_recipe

    if out is None:
        raise ValueError("--out RUN_DIR is required: the folder the run writes to (and resumes from)")
    train(load_recipe(recipe, overrides or []), out, fresh=fresh, overwrite=overwrite)


def export_cmd(run_dir: Path, hf: Path | None = None) -> None:
    """Write a run's latest checkpoint as a Hugging Face folder (model + tokenizer).

    Args:
        run_dir: a folder written by `lmforge train`.
        hf: output folder; transformers' AutoModelFor... and AutoTokenizer load it (required).
    """
    from lmforge.train.export import export_hf

    if hf is None:
        raise ValueError("--hf OUT is required: the folder to write the Hugging Face checkpoint to")
    out = export_hf(run_dir, hf)
    print(f"exported {run_dir} -> {out}")
