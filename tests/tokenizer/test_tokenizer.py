"""Tokenizer: lone surrogates, batch encoding and decoding edge cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Engine
from tokenizers.processors import TemplateProcessing

from lmforge.tokenizer import Tokenizer

# Any code point, lone surrogates included (Python strs may hold them; they are not valid Unicode).
WITH_SURROGATES = st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=60)


@given(WITH_SURROGATES)
@settings(max_examples=200, deadline=None)
def test_bpe_round_trips_strings_with_lone_surrogates(trained, text):
    tok = trained["bpe"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch(["ok", text]) == [tok.encode("ok"), ids]


def test_surrogates_become_their_surrogatepass_bytes(trained):
    tok = trained["bpe"]
    text = "a\udcff b \ud83d\ude00"  # a surrogateescape byte and a surrogate *pair* written as two code points
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.engine.decode(ids).count("\ufffd") >= 3  # the engine alone can only decode them lossily
    with_specials = tok.encode(text, add_special_tokens=True)
    assert with_specials == ids  # bpe adds nothing around a sequence


def test_surrogates_keep_the_special_token_template(trained):
    bpe = trained["bpe"]
    tok = Tokenizer(Engine.from_str(bpe.engine.to_str()), specials=bpe.specials)
    tok.engine.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>",
        special_tokens=[("<|begin_of_text|>", bpe.bos_id), ("<|end_of_text|>", bpe.eos_id)])
    ids = tok.encode("a\ud800b", add_special_tokens=True)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
    assert ids[1:-1] == tok.encode("a\ud800b")
    assert tok.decode(ids, skip_special_tokens=True) == "a\ud800b"


def test_surrogates_are_refused_by_tokenizers_that_are_not_byte_level(trained):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 1.*not byte-level"):
        trained["unigram"].encode("a\ud800")
    with pytest.raises(ValueError, match="lone surrogate"):
        trained["wordpiece"].encode_batch(["fine", "\udfff"])
    with pytest.raises(TypeError):
        trained["bpe"].encode(None)  # non-str input is still the engine's TypeError


def test_decode_of_a_cut_multibyte_character_does_not_raise(trained):
    tok = trained["bpe"]
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes are not one token in this tiny vocabulary
    assert tok.decode(ids[:-1]) == tok.engine.decode(ids[:-1])  # lossy, as the engine
    assert "\ufffd" in tok.decode(ids[:-1])


def test_decode_skips_special_tokens_on_the_exact_byte_path(trained):
    tok = trained["bpe"]
    text = f"x\ud800{tok.specials['eos']}y"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "x\ud800y"


def test_encode_batch_equals_encode(trained, corpus):
    for tok in trained.values():
        texts = corpus[:5] + ["", " ", "\n"]
        for add in (False, True):
            assert tok.encode_batch(texts, add_special_tokens=add) == [tok.encode(t, add) for t in texts]


def test_load_names_the_fix_for_a_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
