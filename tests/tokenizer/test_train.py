"""train_tokenizer: the three kinds, their special tokens, AutoTokenizer equality and user errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.tokenizer.chat import CHAT_ROLE_TOKENS, CHATML_TEMPLATE
from lmforge.tokenizer.tokenizer import unicode_to_bytes

from .conftest import CORPUS, SIZES

SAMPLES = [
    "The quick brown fox, 1234567 times!",
    "Café 東京 😀 naïve\tTAB\nnew line  two spaces",
    "def f(x):\n    return x ** 2  # <|im_start|> inside code",
    "[CLS] [MASK] <extra_id_0> <pad> </s> words after",
    "unseen: ꙮ ᚠ ☃ \x00\x07 \u200b",
    "",
]
ARBITRARY_TEXT = st.text(max_size=200)  # any Unicode scalar values: emoji, control characters, unassigned


@given(ARBITRARY_TEXT)
@settings(max_examples=300, deadline=None)
def test_bpe_round_trips_arbitrary_unicode_without_unknown_tokens(trained, text):
    tok = trained["bpe"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id is None and tok.token_to_id("<unk>") is None
    assert all(0 <= i < tok.vocab_size for i in ids)


@given(ARBITRARY_TEXT)
@settings(max_examples=100, deadline=None)
def test_bpe_tokens_spell_the_utf8_bytes(trained, text):
    """Every token is a byte-level piece (specials are printable ASCII, spelled as themselves)."""
    tok, table = trained["bpe"], unicode_to_bytes()
    pieces = [tok.id_to_token(i) for i in tok.encode(text)]
    assert b"".join(bytes(table[c] for c in piece) for piece in pieces) == text.encode("utf-8")


def test_bpe_splits_digits_one_by_one(trained):
    tok = trained["bpe"]
    ids = tok.encode("1969 and 1234567")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("1969") + list("1234567"), digits


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_autotokenizer_gives_the_same_ids_and_text(kind, trained, hf_tokenizers):
    ours, hf = trained[kind], hf_tokenizers[kind]
    assert len(hf) == ours.vocab_size
    for text in SAMPLES + CORPUS[:3]:
        for add in (False, True):
            expected = hf(text, add_special_tokens=add)["input_ids"]
            assert ours.encode(text, add_special_tokens=add) == expected, (kind, add, text)
            assert ours.encode_batch([text, text], add_special_tokens=add) == [expected, expected]
        ids = ours.encode(text, add_special_tokens=True)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert hf.chat_template == CHATML_TEMPLATE
    for role in ("bos", "eos", "pad", "unk", "mask"):
        assert getattr(hf, f"{role}_token_id") == getattr(ours, f"{role}_id"), role


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_special_tokens_are_never_split(kind, trained):
    tok = trained[kind]
    specials = [*tok.specials.values(), *CHAT_ROLE_TOKENS]
    for token in specials:
        idx = tok.token_to_id(token)
        assert idx in tok.special_ids(), token
        assert idx not in tok.encode("abc" + token[:-1])  # only the exact string
        ids = tok.encode(f"xy{token}z{token}")
        assert ids.count(idx) == 2, (token, ids)
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "xyz"


def test_special_token_ids_follow_the_documented_layout(trained):
    bpe, wp, ug = trained["bpe"], trained["wordpiece"], trained["unigram"]
    assert [bpe.bos_id, bpe.eos_id, bpe.pad_id] == [0, 1, 2]
    assert [bpe.token_to_id(t) for t in CHAT_ROLE_TOKENS] == [3, 4]
    assert [wp.pad_id, wp.unk_id, wp.bos_id, wp.eos_id, wp.mask_id] == [0, 1, 2, 3, 4]
    assert wp.id_to_token(wp.bos_id) == "[CLS]" and wp.id_to_token(wp.eos_id) == "[SEP]"
    assert [ug.pad_id, ug.eos_id, ug.unk_id] == [0, 1, 2]  # T5's order


def test_wordpiece_templates_and_lowercase(trained, corpus):
    wp = trained["wordpiece"]
    ids = wp.encode("The CAFÉ", add_special_tokens=True)
    assert ids[0] == wp.bos_id and ids[-1] == wp.eos_id
    assert wp.decode(ids, skip_special_tokens=True) == "the cafe"
    assert wp.encode("THE Café") == wp.encode("the cafe")
    cased = train_tokenizer("wordpiece", corpus, SIZES["wordpiece"])
    assert cased.decode(cased.encode("The Café")) == "The Café"
    assert any(t.startswith("##") for t in cased.engine.get_vocab())
    with pytest.raises(ValueError, match="wordpiece only"):
        train_tokenizer("bpe", corpus, 400, lowercase=True)


def test_unigram_sentinels_sit_at_the_end_in_reverse_order(trained):
    ug = trained["unigram"]
    assert ug.vocab_size <= SIZES["unigram"]
    ids = [ug.token_to_id(f"<extra_id_{i}>") for i in range(5)]
    assert ids == [ug.vocab_size - 1 - i for i in range(5)]
    assert set(ids) <= ug.special_ids()
    assert ug.encode("a <extra_id_3> b").count(ids[3]) == 1
    assert ug.encode("word", add_special_tokens=True)[-1] == ug.eos_id  # T5 appends </s>
    assert ug.decode(ug.encode("the quick brown fox")) == "the quick brown fox"


def test_special_tokens_are_configurable(corpus):
    tok = train_tokenizer("bpe", corpus, 300, special_tokens={"bos": "<s>", "pad": None, "mask": "<mask>"},
                          chat_roles=False, n_sentinels=2)
    assert tok.specials == {"bos": "<s>", "eos": "<|end_of_text|>", "mask": "<mask>"}
    assert tok.pad_id is None and tok.mask_id is not None
    assert tok.token_to_id("<|im_start|>") is None and tok.chat_template is None
    assert tok.token_to_id("<extra_id_0>") == tok.vocab_size - 1
    assert tok.encode("a<mask>b").count(tok.mask_id) == 1


def test_vocab_size_limits_are_exact(corpus):
    with pytest.raises(ValueError, match="at least 261"):  # 256 bytes + 3 specials + 2 chat markers
        train_tokenizer("bpe", corpus, 260)
    assert train_tokenizer("bpe", corpus, 261).vocab_size == 261
    for kind in ("wordpiece", "unigram"):
        with pytest.raises(ValueError, match=r"at least (\d+)") as info:
            train_tokenizer(kind, corpus, 40)
        minimum = int(info.value.args[0].rsplit(" ", 1)[-1])
        assert train_tokenizer(kind, corpus, minimum).vocab_size <= minimum
        with pytest.raises(ValueError, match=f"at least {minimum}"):
            train_tokenizer(kind, corpus, minimum - 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sentencepiece"}, "unknown tokenizer kind 'sentencepiece'.*bpe"),
        ({"special_tokens": {"cls": "[CLS]"}}, "unknown special-token role 'cls'"),
        ({"kind": "wordpiece", "special_tokens": {"unk": None}}, "needs an unk token"),
        ({"kind": "wordpiece", "special_tokens": {"bos": None}}, r"\['bos'\]"),
        ({"special_tokens": {"bos": "<|pad|>"}}, "must be distinct"),
        ({"n_sentinels": -1}, "n_sentinels must be >= 0"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match, corpus):
    args = {"kind": "bpe", "texts": corpus, "vocab_size": 400, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_tokenizer(args.pop("kind"), args.pop("texts"), args.pop("vocab_size"), **args)


def test_training_is_deterministic_and_saves_round_trip(trained, saved, corpus):
    again = train_tokenizer("bpe", corpus, SIZES["bpe"])
    assert again.fingerprint == trained["bpe"].fingerprint
    loaded = Tokenizer.load(saved["unigram"])
    assert loaded.fingerprint == trained["unigram"].fingerprint
    assert loaded.specials == trained["unigram"].specials
    assert loaded.chat_template == CHATML_TEMPLATE
