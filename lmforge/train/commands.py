"""Train models from YAML recipes and export the result."""

from __future__ import annotations

from pathlib import Path


def train_cmd(recipe: Path, out: Path | None = None, fresh: bool = False, overwrite: bool = False,
              overrides: list[str] | None = None) -> None:
    """Train a model from a YAML recipe, or resume it: running again with the same --out continues
    from its latest checkpoint. Any recipe field can be overridden as --section.key=value.

    The recipe fields (model, data, batch, optim, schedule, train, eval, checkpoint) are documented in
    lmforge/train/recipe.py (optim: lmforge/train/optim.py OptimConfig, schedule:
    lmforge/train/schedule.py ScheduleConfig); recipes/ has examples. A resumed run may change
    train.steps, the optim and schedule settings, eval / checkpoint cadence, precision and the like
    (logged, and recorded in the run's recipe.yaml), not the model, data, seq_len, global batch or seed.

    Under torchrun (`torchrun --nproc-per-node N -m lmforge train ...`) the same recipe runs
    data-parallel on N processes. One run at a time per --out: a second one fails at once.

    Args:
        recipe: YAML recipe file (see recipes/).
        out: run folder for checkpoints, metrics.jsonl, loss.png and the tokenizer (required).
        fresh: start over instead of resuming; refuses a non-empty run folder unless --overwrite is given
            too, and never deletes a folder that is not a run folder (no run.json or checkpoints/).
        overwrite: with --fresh, delete the existing run folder's contents first (an error without --fresh).
        overrides: section.key=value pairs, normally written directly as --section.key=value.
    """
    from lmforge.train.loop import train
    from lmforge.train.recipe import load_recipe

    if out is None:
        raise ValueError("--out RUN_DIR is required: the folder the run writes to (and resumes from)")
    train(load_recipe(recipe, overrides or []), out, fresh=fresh, overwrite=overwrite)


def export_cmd(run_dir: Path, hf: Path | None = None, overwrite: bool = False) -> None:
    """Write a run's latest checkpoint as a Hugging Face folder (model + tokenizer).

    Args:
        run_dir: a folder written by `lmforge train`.
        hf: output folder, new or empty; transformers' AutoModelFor... and AutoTokenizer load it (required).
        overwrite: export into a non-empty --hf folder, replacing the Hugging Face checkpoint and tokenizer
            files there (config.json, *.safetensors, tokenizer files, ...); other files are kept.
    """
    from lmforge.train.export import export_hf

    if hf is None:
        raise ValueError("--hf OUT is required: the folder to write the Hugging Face checkpoint to")
    out = export_hf(run_dir, hf, overwrite=overwrite)
    print(f"exported {run_dir} -> {out}")
