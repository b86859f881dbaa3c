"""lmforge: build, load, train and run Transformer language models.

Each verb is a function below; its options come from its signature and docstring
(see `lmforge/_argparse.py`), so `lmforge VERB --help` is the reference.
Set LMFORGE_DEBUG=1 to see the traceback of a user error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lmforge._argparse import run
from lmforge.data.commands_fetch import fetch_cmd as data_fetch
from lmforge.data.commands_fetch import list_cmd as data_list
from lmforge.data.commands_prepare import prepare as data_prepare
from lmforge.data.commands_tokenizer import eval_cmd as tokenizer_eval
from lmforge.data.commands_tokenizer import train_cmd as tokenizer_train
from lmforge.eval.demo import demo
from lmforge.generate.commands import chat_cmd, generate_cmd
from lmforge.generate.quantize import quantize_cmd
from lmforge.train.commands import export_cmd, train_cmd


def info(model: str, seq_len: int = 16, seed: int = 0) -> None:
    """Print a model's config, its parameter count and one forward pass on random tokens.

    A model with random weights should show a loss close to log(vocab_size); a trained one
    shows a loss far from it (the tokens are random, so lower is not better here).

    Args:
        model: preset name (see `lmforge presets`), HF checkpoint directory or .gguf file.
        seq_len: length of each of the 2 random sequences fed to the model (at least 2).
        seed: seed for the random weights of a preset and for the random tokens.
    """
    import torch
    import torch.nn.functional as F

    from lmforge import ModelConfig, build_model, load
    from lmforge.presets import names as preset_names

    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 to compute a next-token loss, got {seq_len}")
    if model in preset_names():
        cfg = ModelConfig.from_preset(model)
        torch.manual_seed(seed)
        net = build_model(cfg).eval()
        source = f"preset {model!r} (random init, seed {seed})"
    elif Path(model).exists():
        net = load(model).eval()
        cfg = net.config
        source = str(Path(model).resolve())
    else:
        raise ValueError(
            f"{model!r} is neither a preset nor an existing path; presets: {', '.join(preset_names())}"
        )

    print(f"model: {source}")
    print(cfg.summary())
    total = sum(p.numel() for p in net.parameters())
    embedding = sum(
        p.numel() for name, p in net.named_parameters() if name.startswith(("embed.", "positions."))
    )
    print(
        f"parameters: {total:,} ({total / 1e6:.2f}M), non-embedding: {total - embedding:,} "
        f"({(total - embedding) / 1e6:.2f}M)"
    )

    torch.manual_seed(seed)
    input_ids = torch.randint(0, cfg.vocab_size, (2, seq_len))  # (B, T)
    with torch.no_grad():
        out = net(input_ids, input_ids) if cfg.arch == "encoder_decoder" else net(input_ids)
    if out.logits is None:  # a bare encoder: hidden states only
        print(f"input_ids: {tuple(input_ids.shape)}  hidden: {tuple(out.hidden.shape)}")
        return
    logits = out.logits  # (B, T, V) for LM heads, (B, labels) / (B, T, labels) for classifiers
    print(f"input_ids: {tuple(input_ids.shape)}  logits: {tuple(logits.shape)}")
    if cfg.head == "lm":
        # next token for decoders and encoder-decoders (fed the same ids), the token itself for an MLM
        shift = 0 if cfg.arch == "encoder" else 1
        predicted = logits[:, : logits.shape[1] - shift].flatten(0, 1).float()
        loss = F.cross_entropy(predicted, input_ids[:, shift:].flatten())
        print(
            f"{'token' if shift == 0 else 'next-token'} loss on random tokens: {loss.item():.4f} "
            f"(uniform log(V) = log({cfg.vocab_size}) = {math.log(cfg.vocab_size):.4f})"
        )


def presets() -> None:
    """List the named model presets with their shapes.

    Only the configs are built, never the models, so this is instant even for large presets.
    """
    from lmforge import ModelConfig
    from lmforge.presets import names as preset_names

    header = ("name", "arch", "n_layer", "d_model", "n_head", "n_kv_head", "vocab")
    rows = [header]
    for name in preset_names():
        cfg = ModelConfig.from_preset(name)
        attn = cfg.attention
        rows.append(
            (name, cfg.arch, cfg.n_layer, cfg.d_model, attn.n_head, attn.n_kv_head, cfg.vocab_size)
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


VERBS = {
    "info": info,
    "presets": presets,
    "tokenizer": {"train": tokenizer_train, "eval": tokenizer_eval},
    "train": train_cmd,
    "export": export_cmd,
    "generate": generate_cmd,
    "chat": chat_cmd,
    "quantize": quantize_cmd,
    "demo": demo,
    "data": {"fetch": data_fetch, "list": data_list, "prepare": data_prepare},
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lmforge` with `argv` (default: sys.argv[1:]) and return the exit code."""
    return run(VERBS, argv, prog="lmforge", description=__doc__)
