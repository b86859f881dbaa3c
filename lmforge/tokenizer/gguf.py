"""The tokenizer stored in a GGUF (llama.cpp) file, rebuilt as a `tokenizers` engine.

A GGUF carries no tokenizer.json, only llama.cpp's metadata: the tokens, their types (1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), merges or scores, special token ids, flags
and the chat template. Two tokenizer models are rebuilt:

- "gpt2": byte-level BPE with the file's merges. How text is split before the merges depends on
  `tokenizer.ggml.pre`; `PRE_SPLITS` holds llama.cpp's regexes (llama-vocab.cpp), applied one after
  the other as llama.cpp does. Unknown pre-tokenizer names are refused rather than guessed.
- "llama": SentencePiece BPE with byte fallback; the file has scores but no merges, so the merges
  are derived from the vocabulary and scores the way transformers' `generate_merges` does.

Control tokens become special tokens (never split, skipped by skip_special_tokens), user-defined ones
plain added tokens, as in transformers' GGUF loader (`integrations/gguf/gguf_tokenizer_mapping.py`).
One deliberate difference: for "smollm"-style files transformers ignores `tokenizer.ggml.pre` and
does not split digits, while llama.cpp and the original tokenizer.json do; we follow llama.cpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Engine

from lmforge.tokenizer.tokenizer import Tokenizer

CONTROL, USER_DEFINED = 3, 4

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges: whole words found in the vocabulary win)
PRE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), ((_GPT2,), False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r"), ((r"\p{N}", _GPT2), False)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"), ((_LLAMA3,), True)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), ((_QWEN2,), False)),
}


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Build the tokenizer described by the metadata of the GGUF file `path`."""
    from gguf import GGUFReader

    path = Path(path)
    reader = GGUFReader(str(path))

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(f"tokenizer.{key}")
        return default if f is None else f.contents()

    kind = field("ggml.model")
    tokens = field("ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(f"{path.name} holds no tokenizer (no tokenizer.ggml.model / tokens metadata)")
    types = field("ggml.token_type") or [1] * len(tokens)
    ids = {role: field(f"ggml.{key}_token_id") for role, key in
           (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    if kind == "gpt2":
        engine = _byte_level_bpe(path, tokens, field("ggml.merges") or [], field("ggml.pre", "default"))
    elif kind == "llama":
        unk = tokens[ids["unk"]] if ids["unk"] is not None else None
        engine = _sentencepiece_bpe(tokens, field("ggml.scores"), unk, field("ggml.add_space_prefix", True))
    else:
        raise ValueError(f"{path.name}: GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2', 'llama'")

    engine.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty == CONTROL])
    engine.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    specials = {role: tokens[i] for role, i in ids.items() if i is not None and 0 <= i < len(tokens)}
    add_bos = field("ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SentencePiece files
    add_eos = field("ggml.add_eos_token", False)
    head = [specials["bos"]] if add_bos and "bos" in specials else []
    tail = [specials["eos"]] if add_eos and "eos" in specials else []
    if head or tail:
        engine.post_processor = processors.TemplateProcessing(
            single=" ".join([*head, "$A", *tail]),
            pair=" ".join([*head, "$A", *tail, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)]),
            special_tokens=[(t, engine.token_to_id(t)) for t in dict.fromkeys(head + tail)],
        )
    return Tokenizer(engine, specials=specials, chat_template=field("chat_template"))


def _byte_level_bpe(path: Path, tokens: list[str], merges: list[str], pre: str) -> Engine:
    if pre not in PRE_SPLITS:
        raise ValueError(f"{path.name}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                         f"supported: {sorted(PRE_SPLITS)}")
    splits, ignore_merges = PRE_SPLITS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    engine = Engine(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    engine.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    engine.decoder = decoders.ByteLevel()
    return engine


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, unk: str | None, add_prefix: bool) -> Engine:
    vocab = {token: i for i, token in enumerate(tokens)}
    scores = scores if scores is not None else [-float(i) for i in range(len(tokens))]
    engine = Engine(models.BPE(vocab=vocab, merges=merges_from_scores(vocab, dict(zip(tokens, scores))),
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    engine.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                    prepend_scheme="first" if add_prefix else "never")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    engine.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return engine


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
    merged-token score first (ties: shorter left, then right piece), as transformers' `generate_merges`."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
