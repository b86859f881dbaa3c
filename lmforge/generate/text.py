"""Generated token ids -> text, one token at a time: incremental decoding and stop strings.

Decoding token by token is not decoding each token alone: a byte-level token may hold half of a UTF-8
character, SentencePiece drops the leading space of the first piece it decodes, WordPiece joins "##"
pieces to the word before. `IncrementalDecoder` therefore decodes a short window of the row's ids
twice, with and without the new tokens, and emits the difference (the scheme of Hugging Face's
text-generation-inference `decode_token` and vLLM's `detokenize_incrementally`); one change: the window's
left context never decodes to "" (special tokens, a lone "▁"), else the next token would be decoded as
the start of the text. Text that ends in an incomplete character (decoded as U+FFFD) is held back until
the character is complete, so the deltas never contain a half character, and their concatenation is
`tokenizer.decode(all ids)` (tested for byte-level BPE, Unigram, WordPiece and byte-fallback SentencePiece).
One exception: invalid UTF-8 from a SentencePiece byte-fallback model, where `decode` turns a whole run of
byte tokens into U+FFFD, valid bytes included, and the stream may show those valid bytes.

`TextStream` adds stop strings on top: a stop string may be split across tokens and may start inside
a token, so it is searched in the decoded text, and any tail of the text that could be the start of a
stop string is held back until it is known not to be one. When a stop string appears, the row's text
ends right before it (the OpenAI API's rule) and the row stops at the token that completed it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what the decoders make of the bytes of an unfinished UTF-8 character


class IncrementalDecoder:
    """One row's token ids -> text deltas whose concatenation is `tokenizer.decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted: the left context of the window
        self.read = 0  # ids[read:] are not fully emitted yet
        self.sent = 0  # characters of the window's new text emitted while its last character was incomplete
        self.emitted = 0  # characters emitted in all

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        """Add one token id; return the text it completes (possibly "")."""
        self.ids.append(int(token))
        context = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if not window.startswith(context):  # a decoder that rewrites its context: leave it all to flush()
            return ""
        new = window[len(context):]
        if new.endswith(_INCOMPLETE):  # emit what is settled, keep the unfinished character (and its ids)
            settled = new.rstrip(_INCOMPLETE)
            delta, self.sent = settled[self.sent:], max(self.sent, len(settled))
        else:
            delta = new[self.sent:]
            # the tokens just emitted become the next left context, unless they show no text alone (special
            # tokens, a lone "▁" that SentencePiece strips at the start): then the context would be empty and
            # the next token would be decoded as if it began the text (losing its leading space)
            if self._decode(self.ids[self.read:]):
                self.prefix = self.read
            self.read, self.sent = len(self.ids), 0
        self.emitted += len(delta)
        return delta

    def flush(self) -> str:
        """Everything not emitted yet, so that the deltas add up to `decode(ids)` exactly (an unfinished
        character at the end stays U+FFFD, as `decode` gives it)."""
        rest = self._decode(self.ids)[self.emitted:]
        self.emitted += len(rest)
        self.prefix = self.read = len(self.ids)
        self.sent = 0
        return rest


def check_stop_strings(stop_strings: Sequence[str] | str | None) -> list[str]:
    """Validate `stop_strings`: a list of non-empty strings (a lone string is refused: it would be read as
    a list of characters)."""
    if stop_strings is None:
        return []
    if isinstance(stop_strings, str):
        raise TypeError(f"stop_strings={stop_strings!r} must be a list of strings; pass [{stop_strings!r}]")
    strings = list(stop_strings)
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_strings holds {s!r}; every stop string must be a non-empty str")
    return strings


class TextStream:
    """One row: token ids in, text out, ending before the first stop string.

        ts = TextStream(tokenizer, ["\\nUser:"])
        delta, stopped = ts.push(token_id)   # stopped: this token completed a stop string
        rest = ts.flush()                    # at the end: the text held back, if the row did not stop
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), skip_special_tokens: bool = True):
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        self.stop_strings = list(stop_strings)
        self.held = ""  # decoded text not emitted yet: it could be the start of a stop string
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """(text now known to precede any stop string, whether a stop string is complete)."""
        if self.stopped:
            raise RuntimeError("TextStream.push after a stop string: the row is finished")
        text = self.held + self.decoder.push(token)
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)], True
        keep = self._partial_stop(text)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The rest of the text (held-back characters, an unfinished character as U+FFFD), still cut before a
        stop string; "" after a stop."""
        if self.stopped:
            return ""
        text, self.held = self.held + self.decoder.flush(), ""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return text[:min(hits)] if hits else text

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string: any stop string still
        to come starts inside it, so it is held back."""
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
