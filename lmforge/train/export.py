"""A run folder's latest checkpoint -> a Hugging Face checkpoint folder (model + tokenizer)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import processors
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models import model_class
from lmforge.models.hf import save_hf
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt

# The files transformers and lmforge read a checkpoint folder's model and tokenizer from. `overwrite` deletes
# these before moving the new export in: a stale shard index, pytorch_model.bin, generation_config.json or
# added_tokens.json left beside the new files would be read with them (an index even takes precedence over
# model.safetensors). Other files (README.md, .gitattributes, ...) are kept.
HF_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
            "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
            "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.spm")
SHOWN = 5  # entries of a non-empty folder named in the error


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
    ckpt.load_checkpoint(latest, model=model, optimizer=None, restore_rng=False, verify=False)  # verified above
    return model.eval()


def check_export_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything unless `overwrite`: the export would mix with it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; pass a new or empty folder to export to")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        shown = ", ".join(present[:SHOWN]) + (f", ... ({len(present)} entries)" if len(present) > SHOWN else "")
        raise ValueError(f"{out} is not empty ({shown}): the export would be mixed with the files already there. "
                         "Pass a new or empty folder, or --overwrite to replace the Hugging Face checkpoint and "
                         "tokenizer files in it (other files are kept)")


def _closing_eos(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with a post-processor that ends every text with EOS when special tokens are added, as the
    run's sources ended in training (`lmforge.data.pair_shards`) and as T5's and Marian's own tokenizers do:
    transformers' `tokenizer(text)` then gives the encoder what it was trained on."""
    eos = tokenizer.specials.get("eos")
    if eos is None:
        return tokenizer
    closing = copy.deepcopy(tokenizer)
    closing.engine.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_id)])
    return closing


def export_hf(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a run's latest checkpoint and its tokenizer to `out` as a Hugging Face folder.

    `out` must be new or empty unless `overwrite`, which first deletes the checkpoint files listed in
    `HF_FILES` there. The export is staged in a sibling folder and moved in only once it is complete, so a
    failed export (e.g. a config the Hugging Face family cannot express) leaves `out` as it was.
    """
    run_dir, out = Path(run_dir), Path(out)
    check_export_folder(out, overwrite)
    model, tokenizer = load_run_model(run_dir), Tokenizer.load(run_dir / "tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed export of this process id
    staging.mkdir()
    try:
        save_hf(model, staging)
        if model.config.arch == "encoder_decoder":
            tokenizer = _closing_eos(tokenizer)
        tokenizer.save(staging)
        if not out.exists():
            staging.rename(out)
            return out
        for pattern in HF_FILES:
            for stale in out.glob(pattern):
                if stale.is_file():
                    stale.unlink()
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
