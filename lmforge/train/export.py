"""A run folder's latest checkpoint -> a Hugging Face checkpoint folder (model + tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models import model_class
from lmforge.models.hf import save_hf
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt


def load_run_model(run_dir: str | Path) -> nn.Module:
    """The model of a run folder at its latest checkpoint, in eval mode."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no run.json; pass a folder written by `lmforge train`")
    cfg = ModelConfig.from_dict(json.loads(info_path.read_text())["model_config"])
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet")
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.to_empty(device="cpu")
    ckpt.load_checkpoint(latest, model=model, optimizer=None, restore_rng=False)
    return model.eval()


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    out = save_hf(load_run_model(run_dir), out)
    Tokenizer.load(Path(run_dir) / "tokenizer").save(out)
    return out
