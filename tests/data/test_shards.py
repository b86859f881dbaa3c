"""Token shards: prepare (dedupe, EOS, deterministic split, byte-identical reruns) and TokenShards
(reads across shard boundaries, rejects truncated, corrupted or mismatched shards)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer as Engine
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.cli import main
from lmforge.data import commands_prepare
from lmforge.data.shard_io import LOCK_FILE, token_dtype
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, TokenShards, prepare_documents
from lmforge.tokenizer import Tokenizer

EOS = "<|endoftext|>"
WORDS = "the a shard token stream of data model train val split byte éclair 数据 🙂 naïve def return".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """`n` distinct documents of varied length (some longer than a small shard)."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for i in range(n)]


def bpe_tokenizer(vocab_size: int = 300) -> Tokenizer:
    engine = Engine(models.BPE())
    engine.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    engine.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    engine.train_from_iterator(make_docs(200, seed=1), trainer)
    return Tokenizer(engine, specials={"eos": EOS})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bpe_tokenizer()


def prep(docs, tok, out, **kwargs):
    kwargs.setdefault("shard_tokens", 97)  # small and odd: many shards, documents straddling them
    kwargs.setdefault("val_fraction", 0.2)
    return prepare_documents(docs, tok, out, progress=False, **kwargs)


def folder_bytes(folder) -> dict[str, bytes]:
    """The data files of a prepared folder (not the empty lock file)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK_FILE}


def test_prepare_dedupes_appends_eos_and_round_trips(tok, tmp_path):
    unique = make_docs(120)
    docs = unique[:60] + unique[:10] + [""] + unique[60:] + unique[5:8]  # 13 duplicates, 1 empty
    prep(docs, tok, tmp_path)
    train, val = TokenShards(tmp_path, "train", tok), TokenShards(tmp_path, "val", tok)
    assert train.index["counts"] == {"documents_seen": len(docs), "bytes_read": sum(len(d.encode()) for d in docs),
                                     "duplicates_removed": 13, "empty_removed": 1, "documents_kept": 120}
    assert train.n_documents + val.n_documents == 120 and val.n_documents > 0
    assert len(train.shards) > 3, "small shard_tokens should give several shards"
    assert train.dtype == np.uint16 and train.eos_id == tok.eos_id

    for split in (train, val):
        decoded = [tok.decode(split.document(i).tolist()) for i in range(split.n_documents)]
        assert decoded == [d for d in unique if d in set(decoded)], "documents kept in input order, decoding exactly"
        ends = split.documents[1:].astype(np.int64) - 1
        assert (split.tokens(0, split.n_tokens)[ends] == tok.eos_id).all(), "every document ends with EOS"
        stream = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in decoded])
        np.testing.assert_array_equal(split.tokens(0, split.n_tokens), stream)
    kept = {tok.decode(s.document(i).tolist()) for s in (train, val) for i in range(s.n_documents)}
    assert kept == set(unique)


def test_tokens_reads_across_shard_boundaries(tok, tmp_path):
    prep(make_docs(80), tok, tmp_path)
    shards = TokenShards(tmp_path, "train")
    flat = np.concatenate([np.asarray(s) for s in shards.shards])
    assert len(flat) == shards.n_tokens and all(len(s) == 97 for s in shards.shards[:-1])
    rng = np.random.default_rng(0)
    cases = [(0, 0), (0, shards.n_tokens), (96, 2), (97, 97), (90, 300), (shards.n_tokens, 0),
             (shards.n_tokens - 1, 1)]
    cases += [(int(s), int(rng.integers(0, shards.n_tokens - s + 1))) for s in rng.integers(0, shards.n_tokens, 50)]
    for start, length in cases:
        np.testing.assert_array_equal(shards.tokens(start, length), flat[start : start + length])
    first, last = shards.documents[:-1] // 97, (shards.documents[1:] - 1) // 97  # shard of each doc's ends
    straddling = np.flatnonzero(first != last).tolist()
    assert straddling, "expected some document to cross a shard boundary"
    for i in straddling:
        np.testing.assert_array_equal(shards.document(i), flat[shards.documents[i] : shards.documents[i + 1] - 1])
    for start, length in [(-1, 2), (0, shards.n_tokens + 1), (5, -1)]:
        with pytest.raises(IndexError, match="out of range"):
            shards.tokens(start, length)
    with pytest.raises(IndexError, match="document"):
        shards.document(shards.n_documents)


def test_split_depends_only_on_document_text(tok, tmp_path):
    docs = make_docs(400)
    big = {"shard_tokens": 4096}  # few files: fsync is the slow part of this test
    prep(docs, tok, tmp_path / "a", batch_docs=7, **big)
    prep(reversed(docs), tok, tmp_path / "b", batch_docs=1000, **big)
    prep(docs[::3] + docs[1::3] + docs[2::3], tok, tmp_path / "c", batch_docs=1, batch_chars=50, **big)

    def val_docs(folder):
        val = TokenShards(folder, "val")
        return {tok.decode(val.document(i).tolist()) for i in range(val.n_documents)}

    val_a = val_docs(tmp_path / "a")
    assert val_a == val_docs(tmp_path / "b") == val_docs(tmp_path / "c")
    assert 40 <= len(val_a) <= 120, f"val_fraction 0.2 of 400 documents gave {len(val_a)}"
    prep(docs, tok, tmp_path / "seeded", seed=1, **big)
    assert val_docs(tmp_path / "seeded") != val_a, "another seed should pick another val split"
    prep(docs, tok, tmp_path / "none", val_fraction=0.0, **big)
    assert TokenShards(tmp_path / "none", "val").n_documents == 0
    assert TokenShards(tmp_path / "none", "train").n_documents == 400


def test_rerun_writes_byte_identical_files(tok, tmp_path):
    docs = make_docs(150)
    prep(docs, tok, tmp_path / "a", inputs=["corpus"])
    prep(iter(docs), tok, tmp_path / "b", inputs=["corpus"], batch_docs=3)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    # re-preparing a folder with bigger shards leaves no stale shard behind
    prep(docs, tok, tmp_path / "b", inputs=["corpus"], shard_tokens=DEFAULT_SHARD_TOKENS)
    assert sorted(folder_bytes(tmp_path / "b")) == ["index.json", "train_00000.bin", "train_docs.bin",
                                                     "val_00000.bin", "val_docs.bin"]
    prep(docs, tok, tmp_path / "b", inputs=["corpus"])
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(300) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32 and token_dtype(200_000) == np.uint32
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(0)
    # a word-level vocabulary of 70k words: ids above 65535 must survive, and there is no EOS
    vocab = {f"w{i}": i for i in range(70_000)}
    engine = Engine(models.WordLevel(vocab, unk_token="w0"))
    engine.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = Tokenizer(engine)
    docs = ["w1 w69999 w65536", "w65535 w2", "w12345"]
    prepare_documents(docs, big, tmp_path, val_fraction=0.0, progress=False)
    shards = TokenShards(tmp_path, "train", big)
    assert shards.dtype == np.uint32 and shards.index["dtype"] == "uint32" and shards.eos_id is None
    assert [shards.document(i).tolist() for i in range(3)] == [[1, 69999, 65536], [65535, 2], [12345]]
    assert (tmp_path / "train_00000.bin").stat().st_size == 6 * 4


@pytest.fixture
def prepared(tok, tmp_path):
    prep(make_docs(100), tok, tmp_path / "shards", inputs={"inputs": ["my-corpus"]})
    return tmp_path / "shards"


def test_truncated_shard_is_rejected(tok, prepared):
    path = prepared / "train_00002.bin"
    path.write_bytes(path.read_bytes()[:-2])
    for verify in (True, False):  # the size check runs even without checksums
        with pytest.raises(ValueError, match=r"train_00002\.bin is 192 bytes, expected 194 .*truncated.*"
                                             r"lmforge data prepare .*my-corpus"):
            TokenShards(prepared, "train", verify=verify)
    TokenShards(prepared, "val")  # the other split is intact


@pytest.mark.parametrize("name", ["train_00001.bin", "train_docs.bin"])
def test_flipped_byte_fails_the_checksum(prepared, name):
    path = prepared / name
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name} has sha256 [0-9a-f]{{64}}, expected [0-9a-f]{{64}}.*re-run"):
        TokenShards(prepared, "train")
    if name.endswith("00001.bin"):
        TokenShards(prepared, "train", verify=False)  # opted out of the full read: sizes still fine


def test_other_tokenizer_is_rejected(tok, prepared):
    TokenShards(prepared, "train", tokenizer=tok)
    other = bpe_tokenizer(vocab_size=280)
    with pytest.raises(ValueError, match=r"another tokenizer: expected fingerprint .*\(vocab 300\).*\(vocab 280\)"):
        TokenShards(prepared, "train", tokenizer=other)


def test_missing_or_unknown_index_is_rejected(prepared):
    with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'val'\]"):
        TokenShards(prepared, "test")
    index = prepared / "index.json"
    index.write_text(index.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(ValueError, match="format version 99, this lmforge reads version 1"):
        TokenShards(prepared)
    index.unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json not found.*lmforge data prepare"):
        TokenShards(prepared)


def test_missing_shard_file_is_rejected(prepared):
    (prepared / "val_docs.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"val_docs\.bin is missing .*re-run `lmforge data prepare"):
        TokenShards(prepared, "val")


def test_interrupted_prepare_leaves_no_index_and_no_temp_files(tok, prepared):
    def failing():
        yield from make_docs(50)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        prep(failing(), tok, prepared, batch_docs=10)
    assert not list(prepared.glob("*.tmp*"))
    with pytest.raises(FileNotFoundError, match="index.json not found"):
        TokenShards(prepared)


def test_cli_prepare_from_text_files(tok, tmp_path, capsys):
    pytest.importorskip("lmforge.data.corpora", reason="text-file inputs are read by lmforge.data.corpora")
    tok.save(tmp_path / "tok")
    docs = make_docs(30)
    (tmp_path / "texts").mkdir()
    for i, doc in enumerate(docs + docs[:4]):  # 4 duplicate files
        (tmp_path / "texts" / f"{i:03d}.txt").write_text(doc)
    argv = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "shards"),
            "--val-fraction", "0.1", "--shard-tokens", "500", "--no-progress", str(tmp_path / "texts")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "34 read, 4 duplicates and 0 empty removed, 30 kept" in out and "tokens/s" in out
    train, val = TokenShards(tmp_path / "shards", "train", tok), TokenShards(tmp_path / "shards", "val", tok)
    kept = {tok.decode(s.document(i).tolist()) for s in (train, val) for i in range(s.n_documents)}
    assert kept == set(docs)


def test_cli_prepare_usage_errors(tmp_path, capsys):
    assert commands_prepare.SHARD_TOKENS == DEFAULT_SHARD_TOKENS
    assert main(["data", "prepare", "--out", str(tmp_path), "x.txt"]) == 2
    assert "--tokenizer DIR and --out DIR are required" in capsys.readouterr().err
    assert main(["data", "prepare", "--tokenizer", str(tmp_path), "--out", str(tmp_path), "x.txt"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert main(["data", "prepare", "--tokenizer", str(tmp_path), "--out", str(tmp_path), "--val-fraction", "1.5",
                 "x.txt"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err


def test_prepare_reads_the_jsonl_field_it_is_given(tok, tmp_path):
    pytest.importorskip("lmforge.data.corpora", reason="JSONL inputs are read by lmforge.data.corpora")
    import json

    from lmforge.data.shards import prepare

    docs = make_docs(20)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    prepare([str(path)], tok, tmp_path / "out", val_fraction=0.0, field="body", progress=False)
    train = TokenShards(tmp_path / "out", "train", tok)
    assert [tok.decode(train.document(i).tolist()) for i in range(train.n_documents)] == docs
    assert train.index["inputs"] == {"inputs": [str(path)], "field": "body", "column": None}
