"""`lmforge tokenizer train / eval` end to end in a temporary folder, and their user errors."""

from __future__ import annotations

import pytest

from lmforge.cli import main
from lmforge.tokenizer import Tokenizer


@pytest.fixture()
def corpus() -> list[str]:
    from tests.tokenizer.conftest import CORPUS

    return list(CORPUS)


@pytest.fixture()
def texts(tmp_path, corpus):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(corpus[:6]):
        (folder / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(doc)
    (folder / "ignored.bin").write_bytes(b"\x00\xff" * 100)
    return folder


def test_train_then_eval(texts, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", str(texts), str(texts / "doc0.txt"), "--kind", "unigram", "--vocab-size", "200",
            "--sentinels", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tok = Tokenizer.load(out)
    assert f"trained unigram tokenizer: {tok.vocab_size} tokens from 7 documents" in printed
    assert "MB/s" in printed and f"saved to {out}" in printed
    assert tok.vocab_size <= 200 and tok.token_to_id("<extra_id_0>") == tok.vocab_size - 1

    assert main(["tokenizer", "eval", str(out), str(texts / "*.txt"), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = dict(line.split(None, 1) for line in lines[:6])
    assert table["text"].startswith("3 documents")
    assert float(table["bytes/token"]) > 1.0
    assert table["unk"].startswith("rate")
    assert lines[6] == "longest tokens:" and len(lines) == 10


def test_wordpiece_lowercase_from_the_command_line(texts, tmp_path, capsys):
    out = tmp_path / "wp"
    assert main(["tokenizer", "train", str(texts), "--kind", "wordpiece", "--vocab-size", "300", "--lowercase",
                 "--no-chat-roles", "--out", str(out)]) == 0
    tok = Tokenizer.load(out)
    assert tok.decode(tok.encode("The CAT")) == "the cat"
    assert tok.chat_template is None and tok.token_to_id("<|im_start|>") is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "missing.txt", "--out", "x"], "missing.txt"),
        (["train", "nothing*.txt", "--out", "x"], "the pattern 'nothing\\*.txt' matches no file"),
        (["train", "{texts}"], "--out DIR is required"),
        (["train", "{texts}", "--vocab-size", "100", "--out", "x"], "at least 261"),
        (["train", "{texts}", "--kind", "wordpiece", "--vocab-size", "20", "--out", "x"], "too small for the alphabet"),
        (["eval", "{tmp}", "{texts}"], "no tokenizer.json"),
    ],
)
def test_user_errors(argv, message, texts, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = [a.format(texts=texts, tmp=tmp_path) for a in argv]
    assert main(["tokenizer", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge tokenizer {argv[0]}: error:")
    assert message.replace("\\", "") in err


def test_unknown_kind_is_a_usage_error(texts, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tokenizer", "train", str(texts), "--kind", "sentencepiece", "--out", "x"])
    assert info.value.code == 2
    assert "invalid choice: 'sentencepiece'" in capsys.readouterr().err


def test_train_on_a_named_corpus(tmp_path, monkeypatch, capsys):
    """A corpus name is fetched on first use (python-code needs no network) and read record by record."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "python-code", "--vocab-size", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trained bpe tokenizer: 300 tokens" in printed
    tok = Tokenizer.load(out)
    code = "def main():\n    return 0\n"
    assert tok.decode(tok.encode(code)) == code


def test_special_tokens_from_the_command_line(texts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", str(texts), "--vocab-size", "300", "--out", str(out),
            "--special", "eos=</s>", "bos=", "mask=<mask>"]
    assert main(argv) == 0
    tok = Tokenizer.load(out)
    assert tok.specials["eos"] == "</s>" and tok.specials["mask"] == "<mask>" and "bos" not in tok.specials
    assert tok.encode("a </s> b").count(tok.eos_id) == 1, "special tokens are never split"
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    assert main([*argv[:-4], "--special", "eos"]) == 2
    assert "must look like ROLE=TOKEN" in capsys.readouterr().err
