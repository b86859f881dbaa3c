"""A markdown report of a finished causal-LM run: data, model, throughput, MFU, the validation loss
against the unigram baseline, the loss curve and a few sampled continuations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import yaml

from lmforge.data.shards import TokenShards
from lmforge.eval.baseline import unigram_cross_entropy
from lmforge.generate import generate
from lmforge.tokenizer import Tokenizer
from lmforge.train.export import load_run_model
from lmforge.train.metrics import read_metrics, summarize

MAX_BASELINE_TOKENS = 20_000_000  # enough for stable unigram frequencies


@torch.no_grad()
def validation_loss(model, val: TokenShards, seq_len: int, n_windows: int) -> tuple[float, np.ndarray]:
    """Mean next-token loss over the first `n_windows` windows of the validation stream, and their labels."""
    losses, labels = [], []
    for i in range(min(n_windows, (val.n_tokens - 1) // seq_len)):
        window = torch.from_numpy(np.asarray(val.tokens(i * seq_len, seq_len + 1), dtype=np.int64))[None]
        logits = model(window[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item())
        labels.append(window[0, 1:].numpy())
    if not labels:
        raise ValueError(f"the validation split has {val.n_tokens} tokens, fewer than one window of {seq_len + 1}")
    flat = np.concatenate(labels)
    return sum(losses) / len(flat), flat


def samples(model, tokenizer: Tokenizer, val: TokenShards, n: int = 3, prompt_tokens: int = 12,
            new_tokens: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs: prompts are the openings of validation documents."""
    out = []
    for i in range(min(n, val.n_documents)):
        doc = np.asarray(val.document(i), dtype=np.int64)[:prompt_tokens]
        ids = torch.from_numpy(doc)[None]
        new = generate(model, ids, max_new_tokens=new_tokens, temperature=0.8, top_k=50, seed=seed + i,
                       eos_token_id=tokenizer.eos_id)
        out.append((tokenizer.decode(doc.tolist()), tokenizer.decode(new[0].tolist(), skip_special_tokens=True)))
    return out


def write_report(run_dir: str | Path, shards: str | Path, *, n_windows: int = 64, n_samples: int = 3) -> dict:
    """Evaluate the run's final model and write `run_dir/report.md`; returns the headline numbers."""
    run_dir = Path(run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model = load_run_model(run_dir)
    cfg = model.config
    recipe = json.loads((run_dir / "run.json").read_text())
    seq_len = int(yaml.safe_load((run_dir / "recipe.yaml").read_text())["batch"]["seq_len"])
    train, val = TokenShards(shards, "train", tokenizer), TokenShards(shards, "val", tokenizer)
    loss, labels = validation_loss(model, val, seq_len, n_windows)
    baseline = unigram_cross_entropy(train.tokens(0, min(train.n_tokens, MAX_BASELINE_TOKENS)), labels,
                                     tokenizer.vocab_size)
    rows = read_metrics(run_dir)
    steady = rows[len(rows) // 10:] or rows  # the first steps include warm-up costs
    tok_s = summarize([r["tokens_per_s"] for r in steady])
    mfu = summarize([r["mfu"] for r in steady])
    texts = samples(model, tokenizer, val, n=n_samples)
    numbers = {"val_loss": loss, "val_ppl": math.exp(loss), "unigram_loss": baseline,
               "gain_nats": baseline - loss, "tokens_per_s": tok_s["median"], "mfu": mfu["median"],
               "steps": rows[-1]["step"] if rows else 0, "params": sum(p.numel() for p in model.parameters())}
    lines = [
        f"# lmforge run report: {run_dir.name}", "",
        f"- model: {cfg.arch}, {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.attention.n_head} heads "
        f"({cfg.attention.n_kv_head} kv), vocab {cfg.vocab_size}, {numbers['params']:,} parameters",
        f"- data: {', '.join(recipe['data_inputs'])}; {train.n_tokens:,} training tokens, "
        f"{val.n_tokens:,} validation tokens",
        f"- steps: {numbers['steps']}; throughput median {tok_s['median']:,.0f} tokens/s "
        f"(min {tok_s['min']:,.0f}, max {tok_s['max']:,.0f}); MFU median {mfu['median']:.1%}", "",
        "| | nats/token | perplexity |", "|---|---|---|",
        f"| this model (validation, {len(labels):,} tokens) | {loss:.3f} | {math.exp(loss):.1f} |",
        f"| unigram-frequency baseline (same tokens) | {baseline:.3f} | {math.exp(baseline):.1f} |", "",
        f"The model is {baseline - loss:.3f} nats/token better than a model that ignores context.", "",
        "![loss curve](loss.png)", "", "## Samples (temperature 0.8, top-k 50)", "",
    ]
    for prompt, continuation in texts:
        lines += [f"**{prompt!r}** → {continuation!r}", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    numbers["samples"] = texts
    return numbers
