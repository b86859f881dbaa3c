"""Train tokenizers (byte-level BPE, WordPiece, Unigram) and measure them on text.

The verbs live in the data stage because they read the same inputs as `lmforge data prepare`:
fetched corpus names, text files, folders, globs, JSONL and Parquet.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from lmforge.data.corpora import iter_documents
from lmforge.tokenizer.stats import tokenizer_stats
from lmforge.tokenizer.tokenizer import Tokenizer


def train_cmd(inputs: list[str], kind: Literal["bpe", "wordpiece", "unigram"] = "bpe", vocab_size: int = 8192,
              out: Path | None = None, lowercase: bool = False, sentinels: int = 0, chat_roles: bool = True,
              special: list[str] | None = None) -> None:
    """Train a tokenizer on documents and save it as a Hugging Face tokenizer folder.

    Text files are one document each; JSONL and Parquet records and fetched corpora one per record.
    The folder loads with `lmforge.tokenizer.Tokenizer.load(DIR)` and with
    `transformers.AutoTokenizer.from_pretrained(DIR)`, which give the same ids.

    Args:
        inputs: fetched corpus names (see `lmforge data list`), text files, folders, globs, .jsonl or .parquet.
        kind: bpe (byte-level, GPT-2/Llama-3 style), wordpiece (BERT) or unigram (SentencePiece/T5).
        vocab_size: size of the vocabulary, special tokens included.
        out: folder to write the tokenizer to (required).
        lowercase: lowercase and strip accents before tokenizing (wordpiece only, like BERT uncased).
        sentinels: number of T5 sentinel tokens <extra_id_0>, ... to append at the end of the vocabulary.
        chat_roles: add the ChatML markers <|im_start|> / <|im_end|> and store the ChatML chat template.
        special: special tokens as ROLE=TOKEN (roles bos, eos, pad, unk, mask), e.g. eos='</s>';
            ROLE= drops that role's default token.
    """
    from lmforge.tokenizer.train import train_tokenizer

    if out is None:
        raise ValueError("--out DIR is required: the folder to write the tokenizer to")
    specials = parse_specials(special or [])
    counted = _Counted(read_documents(inputs))
    start = time.perf_counter()
    tokenizer = train_tokenizer(kind, counted, vocab_size, lowercase=lowercase, n_sentinels=sentinels,
                                chat_roles=chat_roles, special_tokens=specials)
    seconds = time.perf_counter() - start
    tokenizer.save(out)
    mb = counted.n_bytes / 1e6
    print(f"trained {kind} tokenizer: {tokenizer.vocab_size} tokens from {counted.n_docs} documents "
          f"({mb:.3g} MB) in {seconds:.2f} s ({mb / max(seconds, 1e-9):.3g} MB/s)")
    print("special tokens: " + ", ".join(f"{role}={tok}" for role, tok in tokenizer.specials.items())
          + (f", {sentinels} sentinels" if sentinels else ""))
    print(f"saved to {out}")


def eval_cmd(tokenizer: str, texts: list[str], top: int = 10) -> None:
    """Print bytes per token, tokens per word, vocabulary use and the longest tokens on some text.

    Args:
        tokenizer: tokenizer folder (lmforge or Hugging Face) or .gguf file.
        texts: fetched corpus names, text files, folders, globs, .jsonl or .parquet files.
        top: how many of the longest tokens seen to list.
    """
    tok = Tokenizer.load(tokenizer)
    start = time.perf_counter()
    stats = tokenizer_stats(tok, read_documents(texts), n_longest=top)
    seconds = time.perf_counter() - start
    rows = [
        ("tokenizer", f"{tokenizer} ({stats['vocab_size']} tokens)"),
        ("text", f"{stats['n_texts']} documents, {stats['n_bytes'] / 1e6:.2f} MB, {stats['n_words']} words, "
                 f"{stats['n_tokens']} tokens ({seconds:.2f} s)"),
        ("bytes/token", f"{stats['bytes_per_token']:.3f}"),
        ("tokens/word", f"{stats['tokens_per_word']:.3f}"),
        ("vocab used", f"{stats['vocab_used']:.1%}"),
        ("unk rate", f"{stats['unk_rate']:.3%}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print("longest tokens:")
    for text, n_bytes in stats["longest_tokens"]:
        print(f"  {n_bytes:3d} B  {text!r}")


def parse_specials(entries: list[str]) -> dict[str, str | None]:
    """["eos=</s>", "bos="] -> {"eos": "</s>", "bos": None}."""
    out: dict[str, str | None] = {}
    for entry in entries:
        role, sep, token = entry.partition("=")
        if not sep or not role:
            raise ValueError(f"--special {entry!r} must look like ROLE=TOKEN, e.g. eos='</s>' (or ROLE= to drop it)")
        out[role] = token or None
    return out


def read_documents(inputs: Iterable[str]) -> Iterator[str]:
    """Every document of every input, streamed."""
    return itertools.chain.from_iterable(iter_documents(spec) for spec in inputs)


class _Counted:
    """Passes documents through, counting them and their UTF-8 bytes."""

    def __init__(self, docs: Iterable[str]) -> None:
        self.docs, self.n_docs, self.n_bytes = docs, 0, 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.docs:
            self.n_docs += 1
            self.n_bytes += len(doc.encode("utf-8", "surrogatepass"))
            yield doc
