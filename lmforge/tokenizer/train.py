"""Train a tokenizer with the Hugging Face `tokenizers` engine: byte-level BPE, WordPiece or Unigram.

- bpe (GPT-2 / Llama-3 style): no normalizer; text is split by Llama-3's pre-tokenizer regex with one
  change, digits are split one by one (`\\p{N}` where Llama-3 has `\\p{N}{1,3}`), so every number is
  spelled by the same ten digit tokens (as Llama-1/2, SmolLM and DeepSeek do); the pieces are mapped
  to bytes (ByteLevel without its own regex), and the initial alphabet is all 256 bytes. No input ever
  needs an unknown token and decode(encode(x)) == x exactly (see tokenizer.py for lone surrogates).
- wordpiece (BERT): BertNormalizer (lowercase and accent stripping with `lowercase=True`),
  BertPreTokenizer, WordPiece with "##" continuations; encode(..., add_special_tokens=True) gives
  `[CLS] A [SEP]` (and `[CLS] A [SEP] B [SEP]` for pairs). [CLS] / [SEP] fill the bos / eos roles.
- unigram (SentencePiece / T5): NFKC normalizer, Metaspace ("▁") pre-tokenizer, Unigram model with
  "<unk>"; add_special_tokens=True appends "</s>" as T5 does. Characters never seen in training
  become <unk> (there is no byte fallback).

Special tokens come first in the vocabulary, in the order of `DEFAULTS[kind]["specials"]`, then the
chat role markers "<|im_start|>" and "<|im_end|>" (with `chat_roles`). `n_sentinels` adds T5's
"<extra_id_0>", ... at the END of the vocabulary in reverse order, as T5 does: "<extra_id_0>" has
the largest id, vocab_size - 1. `vocab_size` counts every token, special ones included.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Engine

from lmforge.tokenizer.chat import CHAT_ROLE_TOKENS, CHATML_TEMPLATE
from lmforge.tokenizer.tokenizer import SPECIAL_ROLES, Tokenizer

KINDS = ("bpe", "wordpiece", "unigram")

# Llama-3's pattern (tokenizer.json of Meta-Llama-3) with single digits instead of runs of up to 3.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Per kind: special tokens (role -> token, in id order from 0) and what add_special_tokens=True adds
# around one sequence ("bos"/"eos" name the roles; None: nothing).
DEFAULTS: dict[str, dict[str, Any]] = {
    "bpe": {
        "specials": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"},
        "template": None,  # GPT-2 style: shards put eos between documents themselves
    },
    "wordpiece": {
        "specials": {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"},
        "template": ("bos", "eos"),  # [CLS] A [SEP]
    },
    "unigram": {
        "specials": {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"},  # T5's ids 0, 1, 2
        "template": (None, "eos"),  # A </s>
    },
}


def sentinel_token(i: int) -> str:
    """T5's i-th sentinel, "<extra_id_{i}>"."""
    return f"<extra_id_{i}>"


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, *, lowercase: bool = False,
                    special_tokens: dict[str, str | None] | None = None, n_sentinels: int = 0,
                    chat_roles: bool = True) -> Tokenizer:
    """Train a tokenizer of `kind` ("bpe", "wordpiece", "unigram") on `texts` (one document per item).

    special_tokens: role ("bos", "eos", "pad", "unk", "mask") -> token, overriding the kind's defaults
    in `DEFAULTS`; None drops a default role. `lowercase` applies to wordpiece only. The result may
    hold fewer than `vocab_size` tokens when the corpus is small, never more.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {list(KINDS)}")
    if lowercase and kind != "wordpiece":
        raise ValueError(f"lowercase applies to wordpiece only, not {kind!r}; drop it or use kind='wordpiece'")
    if n_sentinels < 0:
        raise ValueError(f"n_sentinels must be >= 0, got {n_sentinels}")
    specials = _specials(kind, special_tokens)
    reserved = list(specials.values()) + (list(CHAT_ROLE_TOKENS) if chat_roles else [])
    if len(set(reserved)) != len(reserved):
        raise ValueError(f"special tokens must be distinct, got {reserved}")
    n_special = len(reserved) + n_sentinels
    if kind == "bpe" and vocab_size < 256 + n_special:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs its 256 byte tokens plus {n_special} "
            f"special tokens, so at least {256 + n_special}"
        )
    if vocab_size <= n_special:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beside the {n_special} special tokens")

    engine = _BUILDERS[kind](specials, lowercase)
    trainer_size = vocab_size - n_sentinels
    chars: set[str] = set()
    if kind == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=trainer_size, special_tokens=reserved, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        trainer = trainers.WordPieceTrainer(vocab_size=trainer_size, special_tokens=reserved, show_progress=False,
                                            continuing_subword_prefix="##")
    else:
        trainer = trainers.UnigramTrainer(vocab_size=trainer_size, special_tokens=reserved, show_progress=False,
                                          unk_token=specials["unk"])
        texts = _collect_chars(texts, chars)  # to name the minimum size if the alphabet does not fit
    try:
        engine.train_from_iterator(texts, trainer)
        trained = engine.get_vocab_size(with_added_tokens=True)
    except Exception as err:  # the Unigram trainer's answer when the alphabet does not fit
        if kind != "unigram" or "not large enough" not in str(err):
            raise
        trained = None
    if trained is None or trained > trainer_size:  # WordPiece and Unigram keep every character of the corpus
        if kind == "unigram":
            needed = _unigram_minimum(engine, chars) + n_special
        else:
            needed = trained + n_sentinels
        raise ValueError(
            f"vocab_size {vocab_size} is too small for the alphabet of this corpus: its characters and "
            f"{n_special} special tokens need a vocab_size of at least {needed}"
        )
    if n_sentinels:  # appended last, in reverse, so <extra_id_0> is the last id (T5's layout)
        engine.add_special_tokens([AddedToken(sentinel_token(i), special=True, normalized=False)
                                   for i in reversed(range(n_sentinels))])
    _set_template(engine, kind, specials)
    # Reload from JSON: Unigram scores change in the last digit on their first trip through JSON, and
    # the fingerprint of what we return must equal that of the saved folder loaded again.
    engine = Engine.from_str(engine.to_str())
    return Tokenizer(engine, specials=specials, chat_template=CHATML_TEMPLATE if chat_roles else None)


def _specials(kind: str, overrides: dict[str, str | None] | None) -> dict[str, str]:
    specials = dict(DEFAULTS[kind]["specials"])
    for role, token in (overrides or {}).items():
        if role not in SPECIAL_ROLES:
            raise ValueError(f"unknown special-token role {role!r}; valid roles: {list(SPECIAL_ROLES)}")
        if token is None:
            specials.pop(role, None)
        else:
            specials[role] = token
    if kind != "bpe" and "unk" not in specials:
        raise ValueError(f"{kind} needs an unk token for characters it has never seen; keep the 'unk' role")
    return specials


def _bpe(specials: dict[str, str], lowercase: bool) -> Engine:
    engine = Engine(models.BPE())
    engine.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    engine.decoder = decoders.ByteLevel()
    return engine


def _wordpiece(specials: dict[str, str], lowercase: bool) -> Engine:
    engine = Engine(models.WordPiece(unk_token=specials["unk"], continuing_subword_prefix="##"))
    engine.normalizer = normalizers.BertNormalizer(lowercase=lowercase)  # strips accents iff lowercase
    engine.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    engine.decoder = decoders.WordPiece(prefix="##")
    return engine


def _unigram(specials: dict[str, str], lowercase: bool) -> Engine:
    engine = Engine(models.Unigram())
    engine.normalizer = normalizers.NFKC()
    engine.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    engine.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return engine


_BUILDERS = {"bpe": _bpe, "wordpiece": _wordpiece, "unigram": _unigram}


def _set_template(engine: Engine, kind: str, specials: dict[str, str]) -> None:
    """The post-processor behind add_special_tokens=True, e.g. BERT's `[CLS] $A [SEP]`."""
    template = DEFAULTS[kind]["template"]
    if template is None:
        return
    first, last = (specials.get(role) if role else None for role in template)
    if (template[0] and first is None) or (template[1] and last is None):
        missing = [role for role, tok in zip(template, (first, last)) if role and tok is None]
        raise ValueError(f"{kind} puts the {missing} token(s) around each sequence; keep those roles")
    head, tail = [first] if first else [], [last] if last else []
    engine.post_processor = processors.TemplateProcessing(
        single=" ".join([*head, "$A", *tail]),
        pair=" ".join([*head, "$A", *tail, "$B:1", *(f"{t}:1" for t in tail)]),
        special_tokens=[(tok, engine.token_to_id(tok)) for tok in dict.fromkeys(head + tail)],
    )


def _collect_chars(texts: Iterable[str], chars: set[str]) -> Iterator[str]:
    for text in texts:
        chars.update(text)
        yield text


def _unigram_minimum(engine: Engine, chars: set[str]) -> int:
    """Distinct characters after normalisation (spaces become "▁") plus the one piece the trainer adds."""
    normalized = {n for c in chars for n in engine.normalizer.normalize_str(c)}
    return len((normalized - {" "}) | {"▁"}) + 1
