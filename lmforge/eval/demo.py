"""The main job, end to end: fetch a corpus, train a tokenizer, prepare shards, pretrain a small
Llama-style model on the CPU, evaluate it against the unigram baseline, sample, and write a report."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from lmforge.data.corpora import CorpusUnavailableError, fetch_corpus
from lmforge.train.recipe import recipe_from_dict
from lmforge.train.setup import shards_for, tokenizer_for

# A 4-layer, 256-wide Llama (GQA, RoPE, SwiGLU) on 8192 BPE tokens, 1300 steps of 16 x 256 tokens: about 5
# minutes of training on 2 CPU cores with native bf16 (train.precision auto picks it); about 10 in fp32, estimated
# from the fp32 rate (bench/train_throughput.py), not run.
DEMO_RECIPE: dict[str, Any] = {
    "model": {"preset": "debug-llama", "overrides": {
        "n_layer": 4, "d_model": 256, "attention": {"n_head": 4, "n_kv_head": 2}, "mlp": {"d_ff": 704},
        "position": {"kind": "rope", "max_seq_len": 256, "rope_theta": 10000.0, "rope_scaling": "none"}}},
    "data": {"inputs": ["prose"], "tokenizer": {"kind": "bpe", "vocab_size": 8192}, "val_fraction": 0.01},
    "batch": {"seq_len": 256, "micro_batch": 16, "global_batch": 16},
    "optim": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 1.0},
    "schedule": {"kind": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1},
    "train": {"steps": 1300, "seed": 0, "precision": "auto"},
    "eval": {"every": 100, "batches": 8},
    "checkpoint": {"every": 100, "keep_last": 2},
}


def demo(out: Path = Path("runs/demo"), steps: int | None = None, corpus: str = "prose") -> int:
    """Run the main job: fetch a corpus, train a BPE tokenizer, prepare shards, pretrain a small
    Llama-style model for a few minutes, evaluate it and write OUT/report.md.

    Falls back to the offline python-code corpus (and says so) when the registries cannot be reached.
    Running it again resumes or, once finished, only rewrites the report.

    Args:
        out: run folder.
        steps: optimiser steps (default: the demo recipe's 1300, about 5-10 minutes on 2 CPU cores).
        corpus: the corpus to train on (see `lmforge data list`).
    """
    from lmforge.eval.report import write_report  # torch-heavy: imported when the verb runs, not for --help
    from lmforge.train.loop import train

    start = time.perf_counter()
    try:
        fetch_corpus(corpus, progress=True)
    except CorpusUnavailableError as err:
        print(f"could not fetch {corpus!r} ({err}); falling back to the offline python-code corpus", file=sys.stderr)
        corpus = "python-code"
    overrides = [f"data.inputs=[{corpus}]"]
    if steps:  # a short demo warms up for a tenth of its steps (the recipe's 30 at most)
        overrides += [f"train.steps={steps}", f"schedule.warmup_steps={min(30, steps // 10)}"]
    recipe = recipe_from_dict(DEMO_RECIPE, overrides)
    train(recipe, out)
    tokenizer = tokenizer_for(recipe.data)
    numbers = write_report(out, shards_for(recipe.data, tokenizer, recipe.train.seed))
    print(f"\nvalidation loss {numbers['val_loss']:.3f} nats/token (perplexity {numbers['val_ppl']:.1f}) "
          f"vs unigram baseline {numbers['unigram_loss']:.3f}: {numbers['gain_nats']:.3f} nats/token better")
    print(f"throughput {numbers['tokens_per_s']:,.0f} tokens/s, MFU {numbers['mfu']:.1%}")
    for prompt, continuation in numbers["samples"]:
        print(f"  {prompt!r} -> {continuation!r}")
    print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s in all)")
    return 0
