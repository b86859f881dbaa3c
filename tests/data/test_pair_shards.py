"""Pair shards: `lmforge data prepare --pairs` -> PairShards -> ShardLoader -> Seq2SeqPairs /
SequenceClassification batches that decode to the original pairs; dedupe, split, re-runs, resume,
rejection of corrupted or mismatched files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as Engine
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.cli import main
from lmforge.data import pair_shards
from lmforge.data.batchers import IGNORE_INDEX, CausalLM, Seq2SeqPairs, SequenceClassification
from lmforge.data.loader import ShardLoader
from lmforge.data.pair_shards import PairShards, prepare_pairs, sort_labels
from lmforge.data.shard_io import LOCK_FILE
from lmforge.data.shards import TokenShards, prepare_documents
from lmforge.tokenizer import Tokenizer

WORDS = "the a cat dog sat ran der die das Katze Hund le chat chien éclair 数据 🙂 good bad film".split()
LABELS = ["pos", "neg", "neutral"]


def sentence(rng: random.Random, i: int) -> str:
    return f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25)))


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(sentence(rng, i), sentence(rng, -i)) for i in range(n)]


def make_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(sentence(rng, i), rng.choice(LABELS)) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    engine = Engine(models.BPE())
    engine.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    engine.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    engine.train_from_iterator([s for p in make_pairs(100, seed=9) for s in p], trainer)
    return Tokenizer(engine, specials={"pad": "<pad>", "eos": "</s>"})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def all_pairs(folder, tok, decode_target=True) -> list[tuple[str, object]]:
    out = []
    for split in ("train", "val"):
        data = PairShards(folder, split, tok)
        for i in range(data.n_documents):
            ids, target = data.example(i)
            out.append((tok.decode(ids.tolist()), tok.decode(target.tolist()) if decode_target else target))
    return out


def folder_bytes(folder) -> dict[str, bytes]:
    """The data files of a prepared folder (not the empty lock file)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK_FILE}


def test_seq2seq_jsonl_to_batches_round_trip(tok, tmp_path, capsys):
    unique = make_pairs(60)
    records = [{"source": s, "target": t} for s, t in unique + unique[3:9]]  # 6 duplicate pairs
    records.insert(10, {"source": "", "target": "nothing to translate"})
    records.append({"source": unique[0][0], "target": "another translation"})  # same source, new pair: kept
    tok.save(tmp_path / "tok")
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    assert main(["data", "prepare", "--pairs", "seq2seq", "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "shards"), "--val-fraction", "0.2", "--shard-tokens", "101", "--no-progress",
                 str(path)]) == 0
    out = capsys.readouterr().out
    assert "pairs: 68 read, 6 duplicates and 1 empty removed, 61 kept" in out and "train.target:" in out

    expected = unique + [(unique[0][0], "another translation")]
    kept = all_pairs(tmp_path / "shards", tok)
    assert sorted(kept) == sorted(expected), "every distinct pair, decoding exactly, each side aligned"
    train, val = PairShards(tmp_path / "shards", "train", tok), PairShards(tmp_path / "shards", "val", tok)
    assert val.n_documents > 0 and len(train.sources.shards) > 1
    assert {tok.decode(val.example(i)[0].tolist()) for i in range(val.n_documents)}.isdisjoint(
        tok.decode(train.example(i)[0].tolist()) for i in range(train.n_documents)), "a source is in one split only"

    batcher = Seq2SeqPairs(pad_id=tok.pad_id, decoder_start_id=tok.pad_id, eos_id=tok.eos_id)
    loader = ShardLoader(train, batcher, 4, None, seed=0)
    seen = []
    for _ in range(loader.steps_per_epoch):
        batch = next(loader)
        for row in range(4):
            source = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
            target = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
            assert source[-1] == target[-1] == tok.eos_id
            assert batch["decoder_input_ids"][row, 0] == tok.pad_id
            seen.append((tok.decode(source[:-1]), tok.decode(target[:-1])))
    assert len(seen) == len(set(seen)) == train.n_documents // 4 * 4
    assert set(seen) <= set(expected)


def test_classification_labels_round_trip(tok, tmp_path):
    examples = make_examples(80)
    path = tmp_path / "reviews.tsv"
    path.write_text("".join(f"{text}\t{label}\n" for text, label in examples + examples[:5]))
    pair_shards.prepare_pair_inputs([str(path)], tok, tmp_path / "cls", kind="classification", val_fraction=0.2,
                                    progress=False)
    train = PairShards(tmp_path / "cls", "train", tok)
    assert train.labels == ["neg", "neutral", "pos"] and train.label_ids.dtype == np.int64
    kept = [(text, train.labels[label]) for text, label in all_pairs(tmp_path / "cls", tok, decode_target=False)]
    assert sorted(kept) == sorted(examples)

    loader = ShardLoader(train, SequenceClassification(pad_id=tok.pad_id), 8, None, seed=1)
    batch = next(loader)
    for row, item in enumerate(loader.indices(0, 0)):
        ids, label = train.example(int(item))
        assert batch["labels"][row].item() == label
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == ids.tolist()


def test_label_names_sort_numerically_when_they_are_integers(tok, tmp_path):
    assert sort_labels(["10", "2", "0", "1"]) == ["0", "1", "2", "10"]
    assert sort_labels(["b", "10", "a"]) == ["10", "a", "b"]
    examples = [(f"review {i}", str(i % 12)) for i in range(48)]
    prepare_pairs(examples, tok, tmp_path, kind="classification", val_fraction=0.0, progress=False)
    data = PairShards(tmp_path, "train")
    assert data.labels == [str(i) for i in range(12)]
    assert [data.example(i)[1] for i in range(48)] == [i % 12 for i in range(48)], "label '7' has id 7"


def test_split_and_files_depend_only_on_the_pairs(tok, tmp_path):
    pairs = make_pairs(300)
    for name, order, batch in [("a", pairs, 256), ("b", pairs[::-1], 7), ("c", pairs[1::2] + pairs[::2], 1000)]:
        prepare_pairs(order, tok, tmp_path / name, kind="seq2seq", val_fraction=0.2, batch_pairs=batch,
                      shard_tokens=4096, progress=False)

    def val_pairs(folder):
        val = PairShards(folder, "val")
        return {tuple(tok.decode(x.tolist()) for x in val.example(i)) for i in range(val.n_documents)}

    assert val_pairs(tmp_path / "a") == val_pairs(tmp_path / "b") == val_pairs(tmp_path / "c")
    assert 30 <= len(val_pairs(tmp_path / "a")) <= 90
    prepare_pairs(iter(pairs), tok, tmp_path / "a2", kind="seq2seq", val_fraction=0.2, batch_pairs=3,
                  shard_tokens=4096, progress=False)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "a2"), "re-runs are byte-identical"
    # re-preparing a folder of documents as pairs (and back) leaves no stale file behind
    prepare_documents(["one document", "another"], tok, tmp_path / "a2", progress=False)
    assert sorted(folder_bytes(tmp_path / "a2")) == ["index.json", "train_00000.bin", "train_docs.bin",
                                                      "val_docs.bin"]
    prepare_pairs(pairs, tok, tmp_path / "a2", kind="seq2seq", val_fraction=0.2, shard_tokens=4096, progress=False)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "a2")


@pytest.mark.parametrize("kind", ["seq2seq", "classification"])
def test_loader_resumes_pairs_exactly_and_shards_by_rank(tok, tmp_path, kind):
    pairs = make_pairs(50) if kind == "seq2seq" else make_examples(50)
    prepare_pairs(pairs, tok, tmp_path, kind=kind, val_fraction=0.0, progress=False)
    data = PairShards(tmp_path, "train", tok)
    batcher = (Seq2SeqPairs(tok.pad_id, tok.pad_id, tok.eos_id, max_source_len=12) if kind == "seq2seq"
               else SequenceClassification(tok.pad_id, max_len=12))
    make = lambda rank=0, world=1: ShardLoader(data, batcher, 4, None, seed=7, rank=rank, world_size=world)  # noqa: E731
    loader = make()
    assert loader.steps_per_epoch == 12
    run = [next(loader) for _ in range(15)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(make().state_dict() | {"epoch": 0, "step": 9})))
    for i in range(9, 15):
        batch = next(resumed)
        assert batch.keys() == run[i].keys() and all(torch.equal(batch[k], run[i][k]) for k in batch), i
    ranks = [make(r, 2) for r in range(2)]
    taken = [np.concatenate([ld.indices(0, s) for s in range(ld.steps_per_epoch)]) for ld in ranks]
    assert len(set(taken[0]) | set(taken[1])) == len(taken[0]) + len(taken[1]) == 48


@pytest.fixture
def seq2seq_folder(tok, tmp_path):
    prepare_pairs(make_pairs(60), tok, tmp_path / "s2s", kind="seq2seq", val_fraction=0.2, shard_tokens=97,
                  inputs={"inputs": ["translation-de"], "pairs": "seq2seq"}, progress=False)
    return tmp_path / "s2s"


def test_corrupted_or_truncated_pair_shard_is_rejected(tok, seq2seq_folder, tmp_path):
    path = seq2seq_folder / "train.target_00001.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train\.target_00001\.bin has sha256 .*corrupted.*"
                                         r"--pairs seq2seq translation-de"):
        PairShards(seq2seq_folder, "train")
    PairShards(seq2seq_folder, "val")  # the other split is intact
    path.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match="truncated"):
        PairShards(seq2seq_folder, "train", verify=False)

    prepare_pairs(make_examples(40), tok, tmp_path / "cls", kind="classification", val_fraction=0.2, progress=False)
    labels = tmp_path / "cls" / "train_labels.bin"
    ids = np.fromfile(labels, "<i8")
    ids[0] = 3  # an id past the 3 labels, with a matching file size
    ids.tofile(labels)
    with pytest.raises(ValueError, match=r"train_labels\.bin has sha256"):
        PairShards(tmp_path / "cls", "train")
    with pytest.raises(ValueError, match=r"label ids outside \[0, 3\)"):
        PairShards(tmp_path / "cls", "train", verify=False)
    labels.write_bytes(labels.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"train_labels\.bin is \d+ bytes, expected"):
        PairShards(tmp_path / "cls", "train", verify=False)


def test_mismatches_are_rejected_with_the_fix(tok, seq2seq_folder, tmp_path):
    other = Tokenizer(Engine(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="another tokenizer"):
        PairShards(seq2seq_folder, "train", other)
    with pytest.raises(ValueError, match=r"no split 'train'.*seq2seq pairs: read them with .*PairShards"):
        TokenShards(seq2seq_folder, "train")
    assert TokenShards(seq2seq_folder, "train.source").n_documents == PairShards(seq2seq_folder).n_documents
    with pytest.raises(ValueError, match="split must be one of train, val"):
        PairShards(seq2seq_folder, "test")
    prepare_documents(["a document"], tok, tmp_path / "docs", progress=False)
    with pytest.raises(ValueError, match="holds documents, not pairs.*--pairs"):
        PairShards(tmp_path / "docs")
    with pytest.raises(ValueError, match="kind must be one of seq2seq, classification"):
        prepare_pairs([("a", "b")], tok, tmp_path / "x", kind="tagging")

    data = PairShards(seq2seq_folder)
    batcher = Seq2SeqPairs(tok.pad_id, tok.pad_id, tok.eos_id)
    with pytest.raises(ValueError, match="seq_len=128 does not apply to the pair batcher Seq2SeqPairs"):
        ShardLoader(data, batcher, 2, 128, seed=0)
    with pytest.raises(ValueError, match="needs a source of pairs with example"):
        ShardLoader(TokenShards(seq2seq_folder, "train.source"), batcher, 2, None, seed=0)
    with pytest.raises(ValueError, match="seq_len=None must be an integer"):
        ShardLoader(data.sources, CausalLM(), 2, None, seed=0)


def test_too_many_labels_means_seq2seq_data(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(pair_shards, "MAX_LABELS", 5)
    with pytest.raises(ValueError, match="more than 5 distinct labels .*use seq2seq"):
        prepare_pairs(make_pairs(20), tok, tmp_path, kind="classification", batch_pairs=4, progress=False)
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "index.json").exists()


def test_cli_pairs_usage_errors(tok, tmp_path, capsys):
    tok.save(tmp_path / "tok")
    base = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o"), "--pairs"]
    assert main([*base, "seq2seq", "--field", "body", "x.jsonl"]) == 2
    assert "pair inputs have fixed keys" in capsys.readouterr().err
    (tmp_path / "docs.txt").write_text("not pairs")
    assert main([*base, "classification", str(tmp_path / "docs.txt")]) == 2
    assert "pairs are read from .jsonl" in capsys.readouterr().err
