"""The objective registry: batch -> model call -> loss for clm, mlm, span and seq2seq on tiny models
with tiny tokenizers trained in-process, and exact resume of the whole loop for the random objectives."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lmforge.data.batchers import IGNORE_INDEX
from lmforge.data.fetch import default_cache_dir
from lmforge.models import ModelOutput, build_model
from lmforge.tokenizer import train_tokenizer
from lmforge.train.flops import flops_per_token
from lmforge.train.loss import token_loss
from lmforge.train.objectives import REGISTRY, batch_cost, get_objective, model_config, sentinel_ids
from lmforge.train.recipe import OBJECTIVES, recipe_from_dict

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
]
CORPUS = [" ".join(TEXTS[i:] + TEXTS[:i]) for i in range(len(TEXTS))] * 6
# objective -> (tokenizer kind, preset)
CASES = {"clm": ("bpe", "debug-llama"), "mlm": ("wordpiece", "debug-bert"), "span": ("unigram", "debug-t5"),
         "seq2seq": ("bpe", "debug-transformer")}
SEQ_LEN = 32


class Stream:
    """An in-memory token stream: what ShardLoader reads from TokenShards."""

    def __init__(self, ids: list[int]):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.n_tokens = len(self.ids)

    def tokens(self, start: int, length: int) -> np.ndarray:
        return self.ids[start : start + length]


class Pairs:
    """In-memory (source ids, target ids) pairs: what ShardLoader reads from PairShards."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]]):
        self.pairs, self.n_documents = pairs, len(pairs)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.asarray(side) for side in self.pairs[i])


@pytest.fixture(scope="module")
def tokenizers():
    return {"bpe": train_tokenizer("bpe", CORPUS, 400), "wordpiece": train_tokenizer("wordpiece", CORPUS, 300),
            "unigram": train_tokenizer("unigram", CORPUS, 300, n_sentinels=20)}


def _recipe(objective: str, **data):
    return recipe_from_dict({"data": {"objective": objective, **data},
                             "batch": {"seq_len": SEQ_LEN, "micro_batch": 4, "global_batch": 4}})


def _source(objective: str, tok):
    if get_objective(objective).pairs:
        return Pairs([(tok.encode(a), tok.encode(b)) for a, b in zip(TEXTS, TEXTS[1:] + TEXTS[:1])] * 4)
    return Stream([i for text in CORPUS for i in [*tok.encode(text), tok.eos_id]])


def _setup(objective: str, tokenizers, **data):
    kind, preset = CASES[objective]
    tok = tokenizers[kind]
    recipe = _recipe(objective, **data)
    obj = get_objective(objective)
    cfg = model_config(preset, {}, tok)
    obj.check(cfg, recipe.data)
    batch = next(obj.loader(_source(objective, tok), recipe, tok))
    return obj, tok, cfg, batch


def test_registry_covers_the_recipe_objectives_and_explains_unknown_names():
    assert tuple(REGISTRY) == OBJECTIVES
    with pytest.raises(ValueError, match=r"choose one of \['clm', 'mlm', 'seq2seq', 'span'\]"):
        get_objective("dpo")
    with pytest.raises(ValueError, match="data.objective='dpo' is not supported"):
        _recipe("dpo")
    assert [name for name, o in REGISTRY.items() if o.bits_per_byte] == ["clm"]


@pytest.mark.parametrize("objective", list(CASES))
def test_batch_model_call_and_loss(objective, tokenizers):
    """A batch of each objective goes through its model family: loss near log(V) at init, and a few
    Adam steps on the same batch drive it down (so every input reaches the loss)."""
    obj, tok, cfg, batch = _setup(objective, tokenizers)
    model = build_model(cfg, seed=0)
    model.eval()  # no dropout: a clean overfitting signal
    out = obj.forward(model, batch, torch.device("cpu"))
    assert out.logits.shape == (*batch["labels"].shape, cfg.padded_vocab_size)
    loss_sum, n = token_loss(out.logits, batch["labels"])
    first = (loss_sum / n).item()
    assert n > 0 and abs(first - math.log(tok.vocab_size)) < 1.5, (first, math.log(tok.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        loss_sum, n = token_loss(obj.forward(model, batch, torch.device("cpu")).logits, batch["labels"])
        optimizer.zero_grad()
        (loss_sum / n).backward()
        optimizer.step()
    assert (loss_sum / n).item() < first - 1.0, f"{objective}: loss went {first:.3f} -> {(loss_sum / n).item():.3f}"


@pytest.mark.parametrize("objective, expected", [
    ("clm", {"positions", "document_ids"}),
    ("mlm", {"attention_mask"}),
    ("span", {"decoder_input_ids", "attention_mask", "decoder_attention_mask"}),
    ("seq2seq", {"decoder_input_ids", "attention_mask", "decoder_attention_mask"}),
])
def test_each_family_gets_its_inputs(objective, expected, tokenizers):
    """Decoders get packed-document positions, encoders the attention mask, encoder-decoders both sides."""
    extra = {"document_attention": True} if objective == "clm" else {}
    obj, _, _, batch = _setup(objective, tokenizers, **extra)
    seen = {}

    def spy(input_ids, **kwargs):
        seen.update(kwargs)
        return ModelOutput(logits=None)

    obj.forward(spy, batch, torch.device("cpu"))
    assert set(seen) == expected
    assert all(torch.equal(seen[k], batch[k]) for k in seen)


def test_mlm_masks_only_ordinary_tokens(tokenizers):
    obj, tok, _, _ = _setup("mlm", tokenizers)
    loader = obj.loader(_source("mlm", tok), _recipe("mlm"), tok)
    batches = [next(loader) for _ in range(8)]
    batch = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "labels")}
    selected = batch["labels"] != IGNORE_INDEX
    assert selected.any() and not torch.isin(batch["labels"][selected], torch.tensor(sorted(tok.special_ids()))).any()
    seps = batch["input_ids"] == tok.eos_id  # [SEP] between the packed documents, never replaced
    assert seps.any() and not selected[seps].any()
    assert selected.float().mean() == pytest.approx(0.15, abs=0.03)
    assert (batch["input_ids"][selected] == tok.mask_id).float().mean() == pytest.approx(0.8, abs=0.15)
    with pytest.raises(ValueError, match="needs a tokenizer with a mask token.*kind=wordpiece"):
        obj.make_batcher(_recipe("mlm").data, SEQ_LEN, tokenizers["bpe"])


def test_span_corruption_uses_the_tokenizer_sentinels(tokenizers):
    obj, tok, _, batch = _setup("span", tokenizers)
    sentinels = sentinel_ids(tok)
    assert sentinels == list(range(tok.vocab_size - 1, tok.vocab_size - 21, -1)), "T5 layout: <extra_id_0> last"
    assert batch["input_ids"].shape == (4, SEQ_LEN) and (batch["labels"][:, 0] == sentinels[0]).all()
    assert (batch["decoder_input_ids"][:, 0] == tok.pad_id).all()
    with pytest.raises(ValueError, match="set data.tokenizer.sentinels"):
        obj.make_batcher(_recipe("span").data, SEQ_LEN, tokenizers["bpe"])


def test_seq2seq_pairs_are_cut_to_seq_len_and_start_the_decoder_with_pad(tokenizers):
    obj, tok, cfg, batch = _setup("seq2seq", tokenizers)
    assert batch["input_ids"].shape[1] <= SEQ_LEN and batch["labels"].shape[1] <= SEQ_LEN
    assert (batch["decoder_input_ids"][:, 0] == tok.pad_id).all() and cfg.pad_token_id == tok.pad_id
    last = batch["decoder_attention_mask"].sum(1) - 1
    assert (batch["labels"][torch.arange(4), last] == tok.eos_id).all(), "every target ends with EOS"


def test_check_names_the_family_and_the_fix(tokenizers):
    obj = get_objective("mlm")
    with pytest.raises(ValueError, match="trains encoder models.*debug-bert"):
        obj.check(model_config("debug-llama", {}, tokenizers["wordpiece"]), _recipe("mlm").data)
    with pytest.raises(ValueError, match="document_attention applies to data.objective=clm only"):
        obj.check(model_config("debug-bert", {}, tokenizers["wordpiece"]), _recipe("mlm", document_attention=True).data)


def test_model_config_takes_vocab_and_special_ids_from_the_tokenizer(tokenizers):
    tok = tokenizers["unigram"]
    cfg = model_config("debug-t5", {"n_layer": 1, "eos_token_id": 7}, tok)
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id, cfg.n_layer) == (tok.vocab_size, tok.pad_id, 7, 1)


@pytest.mark.parametrize("objective", ["clm", "seq2seq"])
def test_batch_cost_counts_input_tokens_and_both_stacks(objective, tokenizers):
    _, _, cfg, batch = _setup(objective, tokenizers)
    tokens, flops = batch_cost(cfg, batch)
    b, s = batch["input_ids"].shape
    target = batch["decoder_input_ids"].shape[1] if objective == "seq2seq" else None
    assert tokens == b * s and flops == pytest.approx(b * s * flops_per_token(cfg, s, target))


# -- the whole loop: exact resume with random masks, spans and dropout -----------------------------------------

@pytest.fixture
def hermetic_cache(tmp_path, monkeypatch):
    """A private cache (tokenizers, shards), keeping the measured matmul peak so MFU needs no benchmark."""
    peak = default_cache_dir() / "peak_flops.json"
    cache = tmp_path / "cache"
    cache.mkdir()
    if peak.is_file():
        shutil.copy(peak, cache / peak.name)
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))
    return cache


def _data_files(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(CORPUS):
        (docs / f"{i:02d}.txt").write_text(text * 3)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": a, "target": b}) + "\n"
                             for k in range(8) for a, b in zip(TEXTS, TEXTS[k % 5:] + TEXTS[:k % 5])))
    return {"documents": str(docs), "pairs": str(pairs)}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "span", "seq2seq"])
def test_resume_reproduces_the_losses_exactly(objective, hermetic_cache, tmp_path):
    from lmforge.train.loop import train

    kind, preset = CASES[objective]
    files = _data_files(tmp_path)
    recipe = recipe_from_dict({
        "model": {"preset": preset},
        "data": {"inputs": [files["pairs" if objective == "seq2seq" else "documents"]], "objective": objective,
                 "val_fraction": 0.3, "tokenizer": {"kind": kind, "vocab_size": 300,
                                                    "sentinels": 20 if objective == "span" else 0}},
        "batch": {"seq_len": 16, "micro_batch": 2, "global_batch": 4},
        "optim": {"lr": 3e-3}, "train": {"steps": 4, "device": "cpu"},
        "eval": {"every": 2, "batches": 2}, "checkpoint": {"every": 2},
    })
    quiet = dict(log=lambda *a, **k: None)
    whole = tmp_path / "whole"
    train(recipe, whole, **quiet)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")  # as if killed between steps 2 and 4
    train(recipe, resumed, **quiet)

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert [r["loss"] for r in rows(resumed)] == [r["loss"] for r in rows(whole)]
    assert rows(resumed)[-1]["val_loss"] == rows(whole)[-1]["val_loss"]
    assert "val_bpb" not in rows(whole)[-1], "bits per byte is for clm only"
