"""The streaming iterator: its tokens are generate()'s, its text is the tokenizer's decode (never half a
character), stop strings end rows at the token that completes them even when split across tokens, and
top log-probabilities are the model's log_softmax."""

from __future__ import annotations

import random

import pytest
import torch

import lmforge
from lmforge.generate import stream
from lmforge.generate.text import IncrementalDecoder, TextStream
from lmforge.tokenizer import train_tokenizer

TEXTS = ["Héllo wörld, naïve café au lait.", "日本語のテキストです。", "emoji 🤗🚀 and more 🎉 here",
         "The quick brown fox jumps over the lazy dog.", "Ünïcödé ßtraße, señor!"] * 4
NEW = 24


@pytest.fixture(scope="module")
def tokenizers():
    """A byte-level BPE small enough that emoji and CJK characters are split over several tokens, a Unigram
    (SentencePiece-style "▁" spaces) and a WordPiece tokenizer."""
    sizes = {"bpe": 400, "unigram": 160, "wordpiece": 160}
    return {kind: train_tokenizer(kind, TEXTS, size) for kind, size in sizes.items()}


@pytest.fixture(scope="module")
def bpe(tokenizers):
    return tokenizers["bpe"]


def _model(make_model, tok, name="debug-llama", **kw):
    """A random model that writes merged tokens (pieces of words, and of multi-byte characters): the head rows
    of the special and single-byte tokens are zeroed, so their logit 0 loses to the largest random logit."""
    model = make_model(name, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                       tie_embeddings=False, **kw)
    singles = [i for i in range(tok.vocab_size) if len(tok.id_to_token(i)) == 1 or i in tok.special_ids()]
    with torch.no_grad():
        model.head.proj.weight[singles] = 0
    return model


def _prompt(tok, text="Héllo wörld") -> torch.Tensor:
    return torch.tensor([tok.encode(text)])


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_incremental_decode_equals_decode(tokenizers, kind):
    """Real text token by token, and random ids (specials, lone "▁", split UTF-8 bytes): the deltas add up to
    decode(ids), and no delta holds U+FFFD that decode does not (no half characters)."""
    tok = tokenizers[kind]
    rng = random.Random(0)
    cases = [tok.encode(t) for t in TEXTS[:5]]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    split = 0
    for ids in cases:
        decoder = IncrementalDecoder(tok)
        deltas = [decoder.push(i) for i in ids]
        rest = decoder.flush()
        expected = tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) + rest == expected, f"{kind}: ids {ids}\nstream: {deltas + [rest]}\ndecode: {expected!r}"
        if "\ufffd" not in expected:
            assert not any("\ufffd" in d for d in deltas), f"{kind}: a delta holds half a character: {deltas}"
        split += sum(1 for i in ids if "\ufffd" in tok.decode([i]))
    if kind == "bpe":
        assert split > 0, "the test never fed a token holding part of a UTF-8 character"


def test_multibyte_characters_are_held_until_complete(bpe):
    text = "🤗🚀🎉"
    ids = bpe.encode(text)
    assert len(ids) > 3, f"each emoji should take several byte tokens, got {ids}"
    decoder = IncrementalDecoder(bpe)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == text and decoder.flush() == ""
    assert all(d in ("", "🤗", "🚀", "🎉") for d in deltas), f"deltas split an emoji: {deltas}"


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_equals_generate_and_decode(make_model, bpe, use_cache):
    model = _model(make_model, bpe)
    ids = _prompt(bpe).repeat(2, 1)
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=50, seed=[1, 2], use_cache=use_cache)
    steps = list(stream(model, ids, tokenizer=bpe, logprobs=True, **kw))
    new, logprobs = lmforge.generate(model, ids, return_logprobs=True, **kw)
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), new), "streamed tokens differ from generate's"
    assert torch.equal(torch.stack([s.logprobs for s in steps], 1), logprobs)
    for row in range(2):
        text = "".join(s.text[row] for s in steps)
        ended = next((i for i, s in enumerate(steps) if s.finished[row]), len(steps) - 1)
        expected = bpe.decode(new[row, :ended + 1].tolist(), skip_special_tokens=True)
        assert text == expected, f"row {row}: streamed {text!r}, decode gives {expected!r}"
    assert model.training, "the model's mode is restored when the stream ends"


def test_stream_is_checked_eagerly_and_restores_the_mode_when_closed(make_model, bpe):
    model = _model(make_model, bpe)
    with pytest.raises(ValueError, match="need the tokenizer"):
        stream(model, _prompt(bpe), max_new_tokens=4, stop_strings=["x"])  # raised before any iteration
    with pytest.raises(TypeError, match=r"stop_strings='x' must be a list.*\['x'\]"):
        stream(model, _prompt(bpe), max_new_tokens=4, stop_strings="x", tokenizer=bpe)
    with pytest.raises(ValueError, match="every stop string must be a non-empty"):
        stream(model, _prompt(bpe), max_new_tokens=4, stop_strings=[""], tokenizer=bpe)
    with pytest.raises(ValueError, match=r"top_logprobs=-1 must be an integer in \[0, vocab_size="):
        stream(model, _prompt(bpe), max_new_tokens=4, top_logprobs=-1)
    steps = stream(model, _prompt(bpe), max_new_tokens=4)
    next(steps)
    assert not model.training, "the model runs in eval mode while the stream is open"
    assert torch.is_grad_enabled(), "between steps the caller's gradient mode is left alone"
    steps.close()
    assert model.training


def _split_stop(tok, ids: list[int], span: int) -> tuple[str, int, int]:
    """A stop string that starts inside token i (its last character) and ends inside token i + span (its first
    character), occurring nowhere earlier: (string, i + span, start of the string in the text)."""
    text = tok.decode(ids, skip_special_tokens=True)
    prefixes = [tok.decode(ids[:n], skip_special_tokens=True) for n in range(len(ids) + 1)]
    ends = [len(p) if not p.endswith("\ufffd") else None for p in prefixes]  # None: ends inside a character
    for i in range(1, len(ids) - span):
        bounds = ends[i:i + span + 2]  # text boundaries before token i, ..., after token i + span
        if None in bounds or bounds[1] - bounds[0] < 2 or bounds[-1] - bounds[-2] < 2:
            continue
        begin, end = bounds[1] - 1, bounds[-2] + 1
        stop = text[begin:end]
        if "\ufffd" not in stop and text.find(stop) == begin:
            return stop, i + span, begin
    pytest.fail(f"no token boundary to put a stop string across in {text!r}")


@pytest.mark.parametrize("span", [1, 2])  # the stop string spans 2 or 3 tokens
def test_stop_string_split_across_tokens(make_model, bpe, span):
    model = _model(make_model, bpe)
    ids = _prompt(bpe).repeat(2, 1)
    ids[1, -1] = bpe.encode(" the")[0]  # a different row 1
    kw = dict(max_new_tokens=NEW, temperature=0.0, eos_token_id=[], pad_token_id=bpe.pad_id)
    free = lmforge.generate(model, ids, **kw)
    stop, last, begin = _split_stop(bpe, free[0].tolist(), span)
    assert stop not in bpe.decode(free[1].tolist(), skip_special_tokens=True), "pick prompts where only row 0 stops"
    steps = list(stream(model, ids, tokenizer=bpe, stop_strings=[stop], **kw))
    new = torch.stack([s.tokens for s in steps], 1)
    assert new[0, :last + 1].tolist() == free[0, :last + 1].tolist(), "tokens up to the stop must not change"
    assert (new[0, last + 1:] == bpe.pad_id).all(), f"row 0 must stop at token {last}: {new[0].tolist()}"
    assert [bool(s.finished[0]) for s in steps] == [i >= last for i in range(len(steps))]
    assert torch.equal(new[1], free[1]), "row 1 has no stop string and must run to max_new_tokens"
    text = "".join(s.text[0] for s in steps)
    full = bpe.decode(free[0].tolist(), skip_special_tokens=True)
    assert text == full[:begin], f"streamed text must end right before the stop string {stop!r}: {text!r}"
    assert "".join(s.text[1] for s in steps) == bpe.decode(free[1].tolist(), skip_special_tokens=True)
    # generate() with the same stop string: the ids include the completing token
    assert torch.equal(lmforge.generate(model, ids, tokenizer=bpe, stop_strings=[stop], **kw), new)


def test_stop_string_in_one_row_alone_ends_the_loop(make_model, bpe):
    model = _model(make_model, bpe)
    kw = dict(max_new_tokens=NEW, temperature=0.0, eos_token_id=[])
    free = lmforge.generate(model, _prompt(bpe), **kw)
    stop, last, _ = _split_stop(bpe, free[0].tolist(), 1)
    out = lmforge.generate(model, _prompt(bpe), tokenizer=bpe, stop_strings=["never appears", stop], **kw)
    assert out.shape == (1, last + 1), f"the loop must end at the token completing {stop!r}"


def test_text_stream_holds_back_a_possible_stop_string(bpe):
    ts = TextStream(bpe, ["<END>"])
    pieces = [ts.push(i) for i in bpe.encode("ab <EN")]
    assert "".join(p for p, _ in pieces) == "ab ", "a tail that may start a stop string must wait"
    assert ts.flush() == "<EN", "at the end the held-back text comes out"
    ts, text, hit = TextStream(bpe, ["<END>", "b <"]), "", False
    for i in bpe.encode("ab <END> more"):
        delta, hit = ts.push(i)
        text += delta
        if hit:
            break
    assert hit and text == "a", f"the earliest stop string wins: {text!r}"


def test_top_logprobs_are_the_models_log_softmax(make_model, bpe):
    model = _model(make_model, bpe).eval()
    ids = _prompt(bpe).repeat(2, 1)
    new, chosen, top_ids, top_lps = lmforge.generate(model, ids, max_new_tokens=8, temperature=1.0, seed=0,
                                                     eos_token_id=[], top_logprobs=5)
    assert top_ids.shape == top_lps.shape == (2, 8, 5)
    with torch.no_grad():
        logits = model(torch.cat([ids, new], 1)).logits[:, ids.shape[1] - 1:-1]  # (B, N, V)
    reference = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(top_lps, reference.topk(5, -1).values, atol=1e-4, rtol=0)
    torch.testing.assert_close(top_lps, reference.gather(-1, top_ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(chosen, reference.gather(-1, new[..., None])[..., 0], atol=1e-4, rtol=0)
    assert bool((chosen <= top_lps[..., 0] + 1e-6).all()), "no sampled token is more likely than the top one"
    greedy, _, greedy_top, _ = lmforge.generate(model, ids, max_new_tokens=8, temperature=0.0, eos_token_id=[],
                                                top_logprobs=1)
    assert torch.equal(greedy_top[..., 0], greedy), "greedy picks the top alternative"
    empty = lmforge.generate(model, ids, max_new_tokens=0, top_logprobs=3)
    assert [t.shape for t in empty] == [(2, 0), (2, 0), (2, 0, 3), (2, 0, 3)]
