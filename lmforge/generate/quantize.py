"""`lmforge quantize`: weight-only int8 / int4 quantisation of a model, with what it costs and saves.

Reports the bytes of the weights before and after, and the perplexity on held-out text before and
after: exp of the mean next-token cross-entropy over non-overlapping windows of the text (each window
scored from scratch, so its first token is never predicted). The held-out text is `--text FILE`, else
the first `max_tokens` tokens of the offline `python-code` corpus (the Python standard library, documents
in a fixed order joined by EOS), which needs no network and is the same on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HELD_OUT_CORPUS = "python-code"


@dataclass
class QuantizeReport:
    bits: int
    bytes_before: int
    bytes_after: int
    ppl_before: float
    ppl_after: float
    n_tokens: int  # tokens scored (predicted), over all windows
    n_quantized: int  # Linear layers replaced
    n_fallback: int  # of those, layers whose shapes the fast kernel rejects (reference path)
    out: Path


def resolve_model(model: str | Path):
    """A run folder (`lmforge train`), Hugging Face folder or .gguf file -> (model, tokenizer or None)."""
    from lmforge.models.hf import load
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.export import load_run_model

    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder, a Hugging Face folder or a .gguf file")
    if (path / "run.json").is_file():
        net, tok_path = load_run_model(path), path / "tokenizer"
    else:
        net, tok_path = load(path), path
    try:
        tokenizer = Tokenizer.load(tok_path)
    except FileNotFoundError:
        tokenizer = None
    return net.eval(), tokenizer


def held_out_ids(tokenizer, text: Path | None, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` token ids of `text` (or of the python-code corpus), (N,) int64."""
    from lmforge.data.corpora import iter_documents

    docs = [Path(text).read_text()] if text is not None else iter_documents(HELD_OUT_CORPUS)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int, batch_size: int = 4) -> tuple[float, int]:
    """exp(mean next-token NLL) of a decoder-only LM over non-overlapping windows of `ids` (N,); the last,
    shorter window is dropped unless it is the only one. Returns (perplexity, tokens scored)."""
    n_win = max(len(ids) // window, 1)
    windows = ids[: n_win * window].view(n_win, -1)  # (W, T)
    if windows.shape[1] < 2:
        raise ValueError(f"the held-out text has {len(ids)} tokens; perplexity needs at least 2")
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(batch).logits.float()  # (b, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + nll.item(), count + batch[:, 1:].numel()
    return math.exp(total / count), count


def quantize_cmd(model: str, bits: Literal[8, 4] = 8, out: Path | None = None, group_size: int = 64,
                 text: Path | None = None, max_tokens: int = 16384, window: int = 1024,
                 include_head: bool = False) -> QuantizeReport:
    """Quantise a model's weights to int8 or int4 and report the memory and perplexity change.

    Linear layers of attention and MLPs are quantised (weight-only; activations stay floating point);
    embeddings, the LM head (unless --include-head) and MoE experts/routers stay full precision.
    The folder written loads with `lmforge.load(OUT)` and `lmforge generate OUT`.

    Args:
        model: a run folder (`lmforge train`), a Hugging Face checkpoint folder or a .gguf file.
        bits: 8 (per-output-channel absmax int8) or 4 (group-wise int4 with scales and zero points).
        out: folder to write the quantised model and its tokenizer to (required).
        group_size: int4 only: input features per scale / zero point (32, 64, 128 or 256).
        text: held-out text file for perplexity; default: the offline python-code corpus.
        max_tokens: tokens of held-out text to score.
        window: tokens per perplexity window, capped at the model's context length.
        include_head: also quantise an untied LM head's projection.
    """
    from lmforge.models.quantize import quantize_model, save_quantized, weight_bytes
    from lmforge.nn.quant import Int4Linear, Int8Linear

    if out is None:
        raise ValueError("--out DIR is required: the folder to write the quantised model to")
    if bits not in (8, 4):
        raise ValueError(f"--bits must be 8 or 4, got {bits}")
    if max_tokens < 2 or window < 2:
        raise ValueError(f"--max-tokens and --window must be at least 2, got {max_tokens} and {window}")
    net, tokenizer = resolve_model(model)
    if net.config.arch != "decoder" or net.config.head != "lm":
        raise ValueError(f"{model} is a {net.config.arch} model with a {net.config.head!r} head; perplexity "
                         "needs a decoder-only language model")
    if tokenizer is None:
        raise FileNotFoundError(f"{model} has no tokenizer (tokenizer.json) to encode the held-out text with")
    ids = held_out_ids(tokenizer, text, max_tokens)
    window = min(window, net.config.position.max_seq_len)
    source = str(text) if text is not None else f"the {HELD_OUT_CORPUS} corpus"

    bytes_before = weight_bytes(net)
    ppl_before, n_tokens = perplexity(net, ids, window)
    quantize_model(net, bits, group_size=group_size, include_head=include_head)
    layers = [m for m in net.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    fallback = sum(not m.uses_kernel for m in layers)
    bytes_after = weight_bytes(net)
    ppl_after, _ = perplexity(net, ids, window)
    save_quantized(net, out, tokenizer)

    kind = "int8 per output channel" if bits == 8 else f"int4, groups of {group_size}"
    print(f"quantised {len(layers)} Linear layers to {kind} (weight-only)"
          + (f"; {fallback} with shapes the fast kernel rejects run the reference path" if fallback else ""))
    print(f"weights: {bytes_before / 2**20:.2f} MiB -> {bytes_after / 2**20:.2f} MiB "
          f"({bytes_before / bytes_after:.2f}x smaller)")
    print(f"perplexity on {n_tokens} tokens of {source} (windows of {window}): {ppl_before:.3f} -> {ppl_after:.3f} "
          f"({100 * (ppl_after / ppl_before - 1):+.2f}%)")
    print(f"wrote {out}")
    return QuantizeReport(bits, bytes_before, bytes_after, ppl_before, ppl_after, n_tokens, len(layers), fallback,
                          Path(out))
