"""`Tokenizer`: the Hugging Face `tokenizers` engine plus the special tokens lmforge needs.

Saved folders hold `tokenizer.json` (the engine), `tokenizer_config.json` (special tokens, chat
template) and `special_tokens_map.json`, so `transformers.AutoTokenizer.from_pretrained(folder)`
reads them and gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Engine

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask")


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
        return self.engine.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once (the Rust engine parallelises over them)."""
        return [e.ids for e in self.engine.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.engine.decode(ids, skip_special_tokens=skip_special_tokens)

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
        """A folder with tokenizer.json (ours, or any Hugging Face fast tokenizer folder)."""
        folder = Path(folder)
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
