"""ShardLoader: exact resume (position and randomness), rank sharding, epochs, errors."""

import json

import numpy as np
import pytest
import torch

from lmforge.data.batchers import CausalLM
from lmforge.data.loader import ShardLoader
from lmforge.data.masking import Denoising, MaskedLM
from lmforge.data.spans import SpanCorruption

VOCAB, PAD, EOS, MASK = 300, 0, 1, 2
SENTINELS = list(range(VOCAB - 1, VOCAB - 51, -1))


class MemorySource:
    """The `TokenShards` protocol over in-memory documents: a flat stream with EOS after each one."""

    def __init__(self, documents: list[np.ndarray]):
        self.docs = documents
        self.stream = np.concatenate([np.append(d, EOS) for d in documents]).astype(np.uint16)
        self.n_tokens, self.n_documents = len(self.stream), len(documents)

    def tokens(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.n_tokens
        return self.stream[start : start + length]

    def document(self, i: int) -> np.ndarray:
        return self.docs[i]


def random_source(n_docs: int = 40, seed: int = 0) -> MemorySource:
    rng = np.random.default_rng(seed)
    return MemorySource([rng.integers(3, VOCAB - 60, size=rng.integers(5, 60)) for _ in range(n_docs)])


BATCHERS = {
    "clm": CausalLM(eos_id=EOS, document_attention=True),
    "mlm": MaskedLM(vocab_size=VOCAB, mask_id=MASK, special_ids=[PAD, EOS]),
    "span": SpanCorruption(eos_id=EOS, sentinel_ids=SENTINELS, decoder_start_id=PAD),
    "denoising": Denoising(mask_id=MASK, decoder_start_id=EOS, pad_id=PAD),
}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(BATCHERS))
def test_resume_gives_exactly_the_uninterrupted_batches(name):
    source = random_source()
    make = lambda: ShardLoader(source, BATCHERS[name], batch_size=4, seq_len=32, seed=3)  # noqa: E731
    loader = make()
    assert loader.steps_per_epoch < 10, "the run should cross an epoch boundary"
    run, snapshot = [], None
    for i in range(10):
        run.append(next(loader))
        if i == 3:
            snapshot = json.loads(json.dumps(loader.state_dict()))  # plain JSON-able data
    resumed = make()
    resumed.load_state_dict(snapshot)
    for i in range(4, 10):
        assert same(next(resumed), run[i]), f"batch {i + 1} differs after resuming from batch 4"
    fresh = make()  # and a fresh loader replays the run from the start
    assert same(next(fresh), run[0])


def test_epochs_reshuffle_and_seeds_differ():
    source = random_source()
    loader = ShardLoader(source, CausalLM(), batch_size=2, seq_len=16, seed=0)
    assert not np.array_equal(loader.order(0), loader.order(1))
    assert sorted(loader.order(1).tolist()) == list(range(loader.n_items))
    other = ShardLoader(source, CausalLM(), batch_size=2, seq_len=16, seed=1)
    assert not np.array_equal(loader.order(0), other.order(0))
    plain = ShardLoader(source, CausalLM(), batch_size=2, seq_len=16, seed=0, shuffle=False)
    first = next(plain)["input_ids"]
    assert first[0].tolist() == source.stream[:16].tolist() and first[1].tolist() == source.stream[16:32].tolist()


def test_windows_cover_the_stream_and_every_token_is_a_label_once():
    source = random_source()
    loader = ShardLoader(source, CausalLM(), batch_size=1, seq_len=16, seed=0)
    assert loader.n_items == (source.n_tokens - 1) // 16
    labels = [next(loader)["labels"][0] for _ in range(loader.steps_per_epoch)]
    assert loader.epoch == 1 and loader.step == 0
    counts = np.bincount(np.concatenate([np.arange(1 + w * 16, 17 + w * 16) for w in loader.order(0)]))
    assert counts.max() == 1
    assert sorted(torch.cat(labels).tolist()) == sorted(source.stream[1 : 1 + 16 * loader.n_items].tolist())


def test_ranks_get_disjoint_windows_covering_the_data():
    source = random_source(n_docs=60)
    world = 3
    loaders = [ShardLoader(source, CausalLM(), 4, 16, seed=5, rank=r, world_size=world) for r in range(world)]
    assert len({ld.steps_per_epoch for ld in loaders}) == 1, "all ranks must run the same number of steps"
    taken = [np.concatenate([ld.indices(0, s) for s in range(ld.steps_per_epoch)]) for ld in loaders]
    flat = np.concatenate(taken)
    assert len(set(flat.tolist())) == len(flat), "two ranks share a window"
    assert loaders[0].n_items - len(flat) < world * 4, "more than the last partial batch was dropped"
    # The batches hold those windows' tokens, and each rank's batch differs.
    first = [next(ld)["input_ids"] for ld in loaders]
    assert first[0][0].tolist() == source.stream[taken[0][0] * 16 : taken[0][0] * 16 + 16].tolist()
    assert not torch.equal(first[0], first[1])


def test_documents_as_items():
    source = random_source(n_docs=12)
    loader = ShardLoader(source, BATCHERS["denoising"], batch_size=3, seq_len=20, seed=0, by_document=True)
    assert loader.n_items == 12 and loader.steps_per_epoch == 4
    items = loader.indices(0, 0)
    batch = next(loader)
    for row, i in enumerate(items):
        doc = source.docs[i][:20]
        assert batch["labels"][row, : len(doc)].tolist() == doc.tolist()


def test_real_token_shards(tmp_path):
    shards = pytest.importorskip("lmforge.data.shards", reason="lmforge.data.shards (part C) is not there yet")
    from tokenizers import Tokenizer as Engine
    from tokenizers import models, pre_tokenizers

    from lmforge.tokenizer import Tokenizer

    words = [f"w{i}" for i in range(50)]
    engine = Engine(models.WordLevel({w: i for i, w in enumerate(["<pad>", "</s>", "[MASK]", "<unk>", *words])},
                                     unk_token="<unk>"))
    engine.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(engine, specials={"pad": "<pad>", "eos": "</s>", "mask": "[MASK]", "unk": "<unk>"})
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(100)]
    shards.prepare_documents(docs, tok, tmp_path, val_fraction=0.0, shard_tokens=200, progress=False)
    data = shards.TokenShards(tmp_path, "train", tokenizer=tok)
    assert len(data.shards) > 1, "windows should cross shard boundaries"
    make = lambda: ShardLoader(data, CausalLM(eos_id=tok.eos_id, document_attention=True), 4, 24, seed=0)  # noqa: E731
    loader = make()
    run = [next(loader) for _ in range(3)]
    snapshot = loader.state_dict()
    run += [next(loader) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(snapshot)
    assert all(same(next(resumed), b) for b in run[3:])
    stream = np.concatenate(data.shards)
    w = int(loader.indices(0, 0)[0])
    assert run[0]["input_ids"][0].tolist() == stream[w * 24 : w * 24 + 24].tolist()


def test_errors_name_the_value_and_the_fix():
    source = random_source(n_docs=2)
    with pytest.raises(ValueError, match=rf"seq_len=4096 needs windows of 4097 tokens but the source has only "
                                         rf"{source.n_tokens}; lower seq_len or prepare more data"):
        ShardLoader(source, CausalLM(), 1, 4096, seed=0)
    with pytest.raises(ValueError, match="rank=2 must lie in"):
        ShardLoader(source, CausalLM(), 1, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no full batch of 1000"):
        ShardLoader(source, CausalLM(), 1000, 8, seed=0)
    loader = ShardLoader(source, CausalLM(), 1, 8, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="saved with seed=0 but this loader has seed=1"):
        ShardLoader(source, CausalLM(), 1, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="outside an epoch"):
        loader.load_state_dict({**state, "step": 10**6})


def _global_steps(loader: ShardLoader, accumulation: int, n: int) -> list[set[int]]:
    """Items of the next n optimiser steps of one rank's loader (accumulation micro-batches each)."""
    steps = []
    for _ in range(n):
        items = set()
        for _ in range(accumulation):
            items |= set(loader.indices(loader.epoch, loader.step).tolist())
            next(loader)
        steps.append(items)
    return steps


def _by_item(loader: ShardLoader, batch: dict[str, torch.Tensor], epoch: int, step: int) -> dict[int, tuple]:
    """Each row of a fixed-length batch, keyed by the item it was cut from."""
    items = loader.indices(epoch, step).tolist()
    return {item: tuple(tuple(batch[k][row].tolist()) for k in sorted(batch)) for row, item in enumerate(items)}


@pytest.mark.parametrize("name", ["mlm", "span"])
def test_a_sample_is_batched_the_same_on_any_rank_and_world_size(name):
    source = random_source(n_docs=60)
    rows = []
    for world, micro in ((1, 4), (2, 2), (4, 1)):
        seen = {}
        for rank in range(world):
            loader = ShardLoader(source, BATCHERS[name], micro, 16, seed=3, rank=rank, world_size=world, global_batch=4)
            for step in range(3):
                seen |= _by_item(loader, loader.batch(0, step), 0, step)
        rows.append(seen)
    assert len(rows[0]) == 12 and rows[0] == rows[1] == rows[2], "masking must depend on the sample, not the rank"
    again = ShardLoader(source, BATCHERS[name], 4, 16, seed=3, global_batch=4)
    assert _by_item(again, again.batch(1, 0), 1, 0) != _by_item(again, again.batch(0, 0), 0, 0), "epochs differ"


def test_variable_length_rows_are_padded_as_the_batcher_pads():
    source = random_source(n_docs=12)
    loader = ShardLoader(source, BATCHERS["denoising"], batch_size=4, seq_len=40, seed=0, by_document=True)
    batch = next(loader)
    reference = BATCHERS["denoising"]([loader.sample(i) for i in loader.indices(0, 0)], np.random.default_rng(0))
    assert batch.keys() == reference.keys()
    for key in batch:
        assert batch[key].shape[1] >= 1 and batch[key].dtype == torch.int64
    for row, item in enumerate(loader.indices(0, 0)):
        doc = loader.sample(item)
        assert batch["labels"][row, : len(doc)].tolist() == doc.tolist()
        assert (batch["labels"][row, len(doc) :] == -100).all()
        assert batch["decoder_attention_mask"][row].sum() == len(doc)
        n = int(batch["attention_mask"][row].sum())
        assert (batch["input_ids"][row, n:] == PAD).all() and (batch["input_ids"][row, :n] != PAD).all()


@pytest.mark.parametrize("saved, resumed", [((2, 2), (1, 4)), ((1, 4), (2, 2)), ((4, 1), (2, 1))])
def test_a_position_saved_with_one_world_size_continues_with_another(saved, resumed):
    source = random_source(n_docs=40)  # 39 windows of 32 tokens: the epoch drops a tail of 7 under every layout
    global_batch = 8

    def ranks(world, micro):
        return [ShardLoader(source, BATCHERS["mlm"], micro, 32, seed=1, rank=r, world_size=world,
                            global_batch=global_batch) for r in range(world)]

    def run(loaders, n):  # items of the next n optimiser steps over all ranks
        accumulation = global_batch // (loaders[0].batch_size * loaders[0].world_size)
        per_rank = [_global_steps(ld, accumulation, n) for ld in loaders]
        return [set().union(*step) for step in zip(*per_rank)]

    reference = run(ranks(*resumed), 12)
    assert ranks(*resumed)[0].n_items == 39 and ranks(*resumed)[0].epoch_samples == 32, "12 steps cross epochs"
    first = ranks(*saved)
    assert run(first, 5) == reference[:5], "the same global batches under any world size"
    state = json.loads(json.dumps(first[0].state_dict()))
    then = ranks(*resumed)
    for loader in then:
        loader.load_state_dict(state)
    assert run(then, 7) == reference[5:], "after resuming, the next global batches are the uninterrupted run's"


def test_resume_refuses_positions_that_mean_other_items():
    source = random_source(n_docs=40)
    loader = ShardLoader(source, CausalLM(), 2, 32, seed=0, global_batch=4)
    next(loader)
    state = loader.state_dict()  # step 1 = sample 2: inside a step of a loader taking 4 per step
    with pytest.raises(ValueError, match="sample 2 of epoch 0.*falls inside a step of this loader"):
        ShardLoader(source, CausalLM(), 2, 32, seed=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="epochs end at sample 32, ours at 36"):
        ShardLoader(source, CausalLM(), 4, 32, seed=0, global_batch=4).load_state_dict(
            {**state, "global_batch": 8})
    with pytest.raises(ValueError, match="global_batch=6 must be a positive multiple of batch_size x world_size"):
        ShardLoader(source, CausalLM(), 2, 32, seed=0, world_size=2, global_batch=6)
