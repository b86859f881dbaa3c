"""Training objectives: what a recipe's `data.objective` means, from prepared data to the loss.

An `Objective` says which data it reads (a packed document token stream, or (source, target) pair
shards), which batcher cuts batches from it, which model family it trains and how that model is
called, and whether bits per byte mean anything for its labels. The loop (`lmforge.train.loop`)
treats every objective alike: the loss is always `token_loss(model(...).logits, batch["labels"])`,
labels -100 where no loss is taken, summed over the step's global label count.

- clm (GPT; Radford et al. 2019): next-token prediction on packed windows of the document stream
  (`CausalLM`), decoder models, `model(input_ids, positions=..., document_ids=...)`.
- mlm (BERT; Devlin et al. 2019 §3.1): 15% of the tokens selected, 80/10/10 mask/random/keep
  (`MaskedLM`), encoder models, `model(input_ids, attention_mask=...)`. Needs a tokenizer with a
  mask token (wordpiece has [MASK]); special tokens are never selected.
  Departure from BERT: samples are seq_len-token windows of the packed stream, documents separated
  by the tokenizer's EOS ([SEP]), without [CLS] and without next-sentence prediction: RoBERTa's
  FULL-SENTENCES input (Liu et al. 2019 §4.2), which they found at least as good.
- span (T5; Raffel et al. 2020 §3.1.4): span corruption of stream windows (`SpanCorruption`),
  encoder-decoder models, `model(input_ids, decoder_input_ids, attention_mask=...,
  decoder_attention_mask=...)`. Needs sentinels: `data.tokenizer.sentinels` (T5: 100).
- seq2seq (Vaswani et al. 2017): (source, target) pairs prepared from a pair corpus such as
  translation-de (`prepare_pairs`), batched by `Seq2SeqPairs` with both sides cut to seq_len,
  encoder-decoder models called as for span.

Decoder inputs start with the pad id (T5 and Marian's decoder_start_token_id), which is also the
model config's pad_token_id, so an exported model generates with Hugging Face's defaults.
Bits per byte is reported for clm only: there the labels are the whole text, so their summed loss
over the text's UTF-8 bytes is a tokenizer-independent property of the model on that text; masked
or corrupted labels are a sampled part of it (and translation labels another text), so the ratio
would compare nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.data.batchers import CausalLM, Seq2SeqPairs
from lmforge.data.loader import ShardLoader
from lmforge.data.masking import MaskedLM
from lmforge.data.spans import SpanCorruption
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import sentinel_token
from lmforge.train.flops import flops_per_token
from lmforge.train.recipe import DataSection, Recipe
from lmforge.train.setup import open_pair_splits, open_splits, pairs_for, shards_for


def sentinel_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... for as long as the tokenizer has them."""
    ids = []
    while (idx := tokenizer.token_to_id(sentinel_token(len(ids)))) is not None:
        ids.append(idx)
    return ids


def _need(tokenizer: Tokenizer, role: str, objective: str, fix: str) -> int:
    idx = getattr(tokenizer, f"{role}_id")
    if idx is None:
        raise ValueError(f"data.objective={objective} needs a tokenizer with a {role} token; {fix}")
    return idx


def _causal(data: DataSection, seq_len: int, tokenizer: Tokenizer) -> CausalLM:
    return CausalLM(eos_id=tokenizer.eos_id, document_attention=data.document_attention)


def _masked(data: DataSection, seq_len: int, tokenizer: Tokenizer) -> MaskedLM:
    mask_id = _need(tokenizer, "mask", "mlm", "train one with data.tokenizer.kind=wordpiece ([MASK])")
    return MaskedLM(vocab_size=tokenizer.vocab_size, mask_id=mask_id, special_ids=sorted(tokenizer.special_ids()),
                    pad_id=_need(tokenizer, "pad", "mlm", "wordpiece has [PAD]"))


def _spans(data: DataSection, seq_len: int, tokenizer: Tokenizer) -> SpanCorruption:
    sentinels = sentinel_ids(tokenizer)
    if not sentinels:
        raise ValueError(f"data.objective=span needs sentinel tokens {sentinel_token(0)}, {sentinel_token(1)}, ... "
                         "in the tokenizer; set data.tokenizer.sentinels (T5: 100)")
    pad_id = _need(tokenizer, "pad", "span", "unigram has <pad>")
    return SpanCorruption(eos_id=_need(tokenizer, "eos", "span", "unigram has </s>"), sentinel_ids=sentinels,
                          decoder_start_id=pad_id, pad_id=pad_id)


def _pairs(data: DataSection, seq_len: int, tokenizer: Tokenizer) -> Seq2SeqPairs:
    pad_id = _need(tokenizer, "pad", "seq2seq", "every trained tokenizer kind has one")
    return Seq2SeqPairs(pad_id=pad_id, decoder_start_id=pad_id, eos_id=tokenizer.eos_id, max_source_len=seq_len,
                        max_target_len=seq_len)


_ENCODER_DECODER_INPUTS = ("decoder_input_ids", "attention_mask", "decoder_attention_mask")


@dataclass(frozen=True)
class Objective:
    """One training objective; see the module docstring for each."""

    name: str
    arch: str  # the model family it trains (ModelConfig.arch)
    pairs: bool  # reads (source, target) pair shards instead of the documents' token stream
    make_batcher: Callable[[DataSection, int, Tokenizer], Any]  # (data, seq_len, tokenizer) -> batcher
    model_inputs: tuple[str, ...]  # batch keys passed to the model by keyword, after input_ids
    bits_per_byte: bool  # every token of the text is a label, so loss per UTF-8 byte means something

    def check(self, cfg: ModelConfig, data: DataSection) -> None:
        if cfg.arch != self.arch or cfg.head != "lm":
            raise ValueError(f"data.objective={self.name} trains {self.arch} models with an LM head, but the preset "
                             f"gives arch={cfg.arch!r}, head={cfg.head!r}; pick a preset of that family "
                             f"(e.g. {EXAMPLE_PRESET[self.name]}) or another objective")
        if data.document_attention and self.name != "clm":
            raise ValueError(f"data.document_attention applies to data.objective=clm only, not {self.name}")

    def prepare(self, data: DataSection, tokenizer: Tokenizer, seed: int, log=print) -> Path:
        """Build (once, cached) the shards this objective reads; returns their folder."""
        return (pairs_for if self.pairs else shards_for)(data, tokenizer, seed, log=log)

    def open(self, folder: Path, tokenizer: Tokenizer) -> tuple[Any, Any]:
        """(train, val) sources of a folder made by `prepare`."""
        return (open_pair_splits if self.pairs else open_splits)(folder, tokenizer)

    def loader(self, source: Any, recipe: Recipe, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1,
               shuffle: bool = True) -> ShardLoader:
        """Resumable, rank-sharded micro-batches of `source` (seeded by train.seed); pair batchers cut
        examples to batch.seq_len themselves."""
        seq_len = recipe.batch.seq_len
        # global_batch: training epochs end at the same sample under any world size, so a run resumes
        # with another number of processes (validation is always read from its start)
        return ShardLoader(source, self.make_batcher(recipe.data, seq_len, tokenizer), recipe.batch.micro_batch,
                           None if self.pairs else seq_len, seed=recipe.train.seed, rank=rank, world_size=world_size,
                           shuffle=shuffle, global_batch=recipe.batch.global_batch if shuffle else None)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device):
        """The model's output for a batch: `model(input_ids, **the objective's inputs present in the batch)`."""
        kwargs = {k: batch[k].to(device) for k in self.model_inputs if k in batch}
        return model(batch["input_ids"].to(device), **kwargs)


EXAMPLE_PRESET = {"clm": "debug-llama", "mlm": "debug-bert", "span": "debug-t5", "seq2seq": "debug-transformer"}

REGISTRY: dict[str, Objective] = {o.name: o for o in (
    Objective("clm", "decoder", False, _causal, ("positions", "document_ids"), bits_per_byte=True),
    Objective("mlm", "encoder", False, _masked, ("attention_mask", "token_type_ids"), bits_per_byte=False),
    Objective("span", "encoder_decoder", False, _spans, _ENCODER_DECODER_INPUTS, bits_per_byte=False),
    Objective("seq2seq", "encoder_decoder", True, _pairs, _ENCODER_DECODER_INPUTS, bits_per_byte=False),
)}


def get_objective(name: str) -> Objective:
    if name not in REGISTRY:
        raise ValueError(f"data.objective={name!r} is not supported; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def batch_cost(cfg: ModelConfig, batch: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(input tokens, training FLOPs) of one batch, from its shapes (padding included: model FLOPs).

    Tokens are input_ids positions (an encoder-decoder's source side); FLOPs are
    tokens x `flops_per_token(cfg, S, T)` with S the input length and T the decoder length.
    """
    b, s = batch["input_ids"].shape
    target = batch["decoder_input_ids"].shape[1] if "decoder_input_ids" in batch else None
    return b * s, b * s * flops_per_token(cfg, s, target)


def model_config(preset: str, overrides: dict[str, Any], tokenizer: Tokenizer) -> ModelConfig:
    """The preset with the recipe's overrides; the vocabulary size and special ids come from the tokenizer
    (the ids only label an exported model, e.g. Hugging Face's decoder_start_token_id = pad_token_id)."""
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return ModelConfig.from_preset(preset, **{**ids, **overrides, "vocab_size": tokenizer.vocab_size})
