"""Tiny tokenizers of all three kinds, trained in-process on a small mixed corpus (prose, code, numbers,
accents, emoji), shared by the tokenizer tests."""

from __future__ import annotations

import pytest

from lmforge.tokenizer import Tokenizer, train_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.",
    "It was the best of times, it was the worst of times; it was the age of wisdom.",
    "In 1969, 600 million people watched the Moon landing; 12 astronauts walked there by 1972.",
    "Café, naïve, résumé and Über are borrowed words; 東京 and Москва are city names. 😀🚀",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))  # 42\n",
    "for i in range(10):\n\tif i % 3 == 0:\n\t\tcontinue\n",
    "She said: \"I'm sure you're right, they'll see it, we've won.\"",
    "MASKED language models (BERT) predict [MASK] tokens; T5 fills <extra_id_0> spans.",
]
CORPUS = [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))] * 8
SIZES = {"bpe": 400, "wordpiece": 300, "unigram": 300}


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(CORPUS)


@pytest.fixture(scope="session")
def trained() -> dict[str, Tokenizer]:
    """One tokenizer per kind: bpe and unigram with defaults (unigram with 5 sentinels), wordpiece lowercased."""
    return {
        "bpe": train_tokenizer("bpe", CORPUS, SIZES["bpe"]),
        "wordpiece": train_tokenizer("wordpiece", CORPUS, SIZES["wordpiece"], lowercase=True),
        "unigram": train_tokenizer("unigram", CORPUS, SIZES["unigram"], n_sentinels=5),
    }


@pytest.fixture(scope="session")
def saved(trained, tmp_path_factory) -> dict[str, str]:
    """The trained tokenizers saved as folders: kind -> folder."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: str(tok.save(root / kind)) for kind, tok in trained.items()}


@pytest.fixture(scope="session")
def hf_tokenizers(saved):
    """The saved folders as loaded by transformers.AutoTokenizer."""
    transformers = pytest.importorskip("transformers")
    return {kind: transformers.AutoTokenizer.from_pretrained(folder) for kind, folder in saved.items()}
