"""`Tokenizer`: the Hugging Face `tokenizers` engine plus the special tokens lmforge needs.

Saved folders hold `tokenizer.json` (the engine), `tokenizer_config.json` (special tokens, chat
template) and `special_tokens_map.json`, so `transformers.AutoTokenizer.from_pretrained(folder)`
reads them and gives the same ids. `Tokenizer.load` also reads the tokenizer stored in a `.gguf` file.

Lone surrogates: a Python `str` may hold unpaired surrogates (U+D800..U+DFFF, e.g. from
`bytes.decode(errors="surrogateescape")`), which are not valid Unicode, and the Rust engine refuses
such strings. A byte-level tokenizer encodes each one as the three bytes of its "surrogatepass"
UTF-8 form (the text between them is encoded as usual), and `decode` turns those bytes back into the
surrogate, so decode(encode(x)) == x holds for every `str`. Other tokenizers raise a ValueError.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Engine
from tokenizers import decoders

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask")
_SURROGATE = re.compile("[\ud800-\udfff]")


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # bytes without a printable glyph go to 256, 257, ... in order
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: a byte-level token's characters -> its bytes."""
    return {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    def __init__(self, engine: Engine, *, specials: dict[str, str] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None) -> None:
        """engine: a `tokenizers.Tokenizer`; specials: role ("bos", "eos", "pad", "unk", "mask") ->
        token string, each of which must be in the vocabulary."""
        self.engine = engine
        self.specials = dict(specials or {})
        unknown = sorted(set(self.specials) - set(SPECIAL_ROLES))
        if unknown:
            raise ValueError(f"unknown special-token role(s) {unknown}; valid roles: {list(SPECIAL_ROLES)}")
        for role, token in self.specials.items():
            if engine.token_to_id(token) is None:
                raise ValueError(f"special token {role}={token!r} is not in the vocabulary; add it when training")
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.byte_level = isinstance(engine.decoder, decoders.ByteLevel)

    # -- ids ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.engine.get_vocab_size(with_added_tokens=True)

    def _id(self, role: str) -> int | None:
        token = self.specials.get(role)
        return None if token is None else self.engine.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad")

    @property
    def unk_id(self) -> int | None:
        return self._id("unk")

    @property
    def mask_id(self) -> int | None:
        return self._id("mask")

    def token_to_id(self, token: str) -> int | None:
        return self.engine.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.engine.id_to_token(idx)

    def special_ids(self) -> set[int]:
        """Ids of every special (added, special=True) token: never masked, never split."""
        return {idx for idx, tok in self.engine.get_added_tokens_decoder().items() if tok.special}

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return self.engine.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the engine's answer to a str holding lone surrogates (and to non-str input)
            if not isinstance(text, str) or not _SURROGATE.search(text):
                raise
            return self._encode_surrogates(text, add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once (the Rust engine parallelises over them, without computing offsets)."""
        try:
            encode = getattr(self.engine, "encode_batch_fast", self.engine.encode_batch)  # tokenizers >= 0.21
            encodings = encode(texts, add_special_tokens=add_special_tokens)
        except TypeError:  # some text holds lone surrogates: take the careful path one text at a time
            return [self.encode(text, add_special_tokens) for text in texts]
        return [e.ids for e in encodings]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.engine.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.byte_level and "\ufffd" in text:  # maybe surrogates that the engine decoded lossily
            exact = self._decode_bytes(ids, skip_special_tokens)
            if exact is not None:
                return exact
        return text

    def _encode_surrogates(self, text: str, add_special_tokens: bool) -> list[int]:
        """Encode the valid text between lone surrogates as usual, each surrogate as its 3 UTF-8 bytes."""
        where = _SURROGATE.search(text)
        if not self.byte_level:
            raise ValueError(
                f"text holds the lone surrogate U+{ord(where.group()):04X} at index {where.start()}, which is not "
                "valid Unicode, and this tokenizer is not byte-level; clean the text first, e.g. "
                "text.encode('utf-8', 'replace').decode()"
            )
        spelling = bytes_to_unicode()
        ids: list[int] = []
        start = 0
        for match in _SURROGATE.finditer(text):
            if match.start() > start:
                ids += self.engine.encode(text[start:match.start()], add_special_tokens=False).ids
            for byte in match.group().encode("utf-8", "surrogatepass"):
                idx = self.engine.token_to_id(spelling[byte])
                if idx is None:
                    raise ValueError(f"byte-level vocabulary lacks the byte token {spelling[byte]!r} (0x{byte:02X})")
                ids.append(idx)
            start = match.end()
        if start < len(text):
            ids += self.engine.encode(text[start:], add_special_tokens=False).ids
        if add_special_tokens:  # what the post-processor puts around one sequence, e.g. "<s> $A"
            probe = self.engine.encode("a", add_special_tokens=True)
            inside = [i for i, seq in enumerate(probe.sequence_ids) if seq == 0]
            ids = probe.ids[: inside[0]] + ids + probe.ids[inside[-1] + 1:]
        return ids

    def _decode_bytes(self, ids: list[int], skip_special_tokens: bool) -> str | None:
        """Byte-level decode that keeps lone surrogates; None when the bytes are not even surrogatepass UTF-8."""
        table = unicode_to_bytes()
        skip = self.special_ids() if skip_special_tokens else set()
        data = bytearray()
        for idx in ids:
            if idx in skip:
                continue
            token = self.engine.id_to_token(idx)
            if token is None:
                return None
            if all(c in table for c in token):
                data += bytes(table[c] for c in token)
            else:  # an added token spelled in plain text (as the engine's ByteLevel decoder does)
                data += token.encode()
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None

    @property
    def fingerprint(self) -> str:
        """sha256 of the engine's canonical JSON: shards record it so a different tokenizer is caught."""
        return hashlib.sha256(self.engine.to_str().encode()).hexdigest()

    # -- files --------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.engine.save(str(folder / "tokenizer.json"))
        tokens = {f"{role}_token": token for role, token in self.specials.items()}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
                                  "clean_up_tokenization_spaces": False}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        """A folder with tokenizer.json (ours, or any Hugging Face fast tokenizer folder), or a .gguf file."""
        folder = Path(folder)
        if folder.suffix == ".gguf" and folder.is_file():
            from lmforge.tokenizer.gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json; pass a folder written by "
                                    "`lmforge tokenizer train` or a Hugging Face fast-tokenizer folder")
        engine = Engine.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        specials = {}
        for role in SPECIAL_ROLES:
            token = config.get(f"{role}_token")
            if isinstance(token, dict):  # AddedToken serialised by transformers
                token = token.get("content")
            if token is not None and engine.token_to_id(token) is not None:
                specials[role] = token
        max_len = config.get("model_max_length")
        return cls(engine, specials=specials, chat_template=config.get("chat_template"),
                   model_max_length=max_len if isinstance(max_len, int) and max_len < 10**9 else None)
