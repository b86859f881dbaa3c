"""`stream` and `generate`: token ids in, new tokens out, for decoder-only and encoder-decoder models.

    new_ids = lmforge.generate(model, input_ids, max_new_tokens=32, temperature=0.0)            # greedy
    new_ids = lmforge.generate(model, input_ids, max_new_tokens=32, temperature=0.0, use_cache=False)
    new_ids, logprobs = lmforge.generate(model, ids, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0,
                                         attention_mask=mask, return_logprobs=True)
    for step in stream(model, ids, max_new_tokens=64, tokenizer=tok, stop_strings=["\\n\\n"]):
        print(step.text[0], end="", flush=True)                  # text deltas as they are decoded

There is one loop, `stream`, the same for every family and every decoding rule; `generate` collects it:

    logits = session.prefill()                        # the prompt (decoder) or start token (encoder-decoder)
    repeat: token = choose(logits); stop rows that emitted a stop id or completed a stop string;
            yield the step; logits = session.step(token)

`session.py` runs the model (positions, masks, KV cache); `sampling.py` turns logits into tokens; `text.py`
turns tokens into text and finds stop strings. Beam search and speculative decoding reuse the first two
with their own loops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.generate.sampling import SamplingParams, choose_tokens, make_generators, token_logprobs, top_logprobs
from lmforge.generate.session import DecoderSession, EncoderDecoderSession
from lmforge.generate.text import TextStream, check_stop_strings
from lmforge.nn.kv_cache import CACHE_KINDS
from lmforge.tokenizer import Tokenizer


def _id_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def context_limit(cfg: ModelConfig) -> int:
    """The most positions the model takes: position.max_seq_len, for every kind of position. A learned
    table has no rows past it; for RoPE, ALiBi, relative and sinusoidal positions it is the length the model
    was trained (or configured) for, past which its output is not to be trusted."""
    return cfg.position.max_seq_len


def decoder_start_id(cfg: ModelConfig, override: int | None = None) -> int:
    """The encoder-decoder's first decoder input: the override, else the config's decoder_start_token_id
    (BART: its eos id, read from config.json), else the pad id (T5 and Marian start from <pad>)."""
    for value in (override, cfg.decoder_start_token_id, cfg.pad_token_id):
        if value is not None:
            return int(value)
    raise ValueError("this encoder-decoder's config names no decoder_start_token_id or pad_token_id; pass "
                     "generate(..., decoder_start_token_id=ID) (T5 and Marian: the pad id; BART: the eos id)")


def prepare_prompt(cfg: ModelConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   max_new_tokens: int, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the prompt batch; return (input_ids, mask), both (B, T'), mask 1 for real tokens.

    The context (`context_limit`) must hold a decoder's longest prompt plus max_new_tokens - 1 (the last new
    token is never fed back), or an encoder-decoder's source and, separately, its max_new_tokens decoder
    inputs. `truncate`: cut prompts that do not fit instead of raising; a decoder keeps each row's LAST
    limit - max_new_tokens + 1 tokens (the text being continued), an encoder-decoder source its FIRST limit
    tokens (the usual right-side truncation of sources: what falls off is the tail, with its eos).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor of token ids (B, T), got {type(input_ids).__name__}"
                        + (f" of {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; pass a batch (B, T), e.g. ids[None] "
                         "for a single prompt")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"the prompt is empty (input_ids has shape {(B, T)}); pass at least one token per row, "
                         "e.g. the tokenizer's BOS id")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if attention_mask is None:
        mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}; they must match")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 1 for real tokens and 0 for padding only")
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"prompt row(s) {rows} are empty (attention_mask is all 0); every row needs a token")
    decoder = cfg.arch == "decoder"
    steps = mask[:, 1:] - mask[:, :-1]  # +1 where padding ends, -1 where it starts
    wrong = (steps < 0) if decoder else (steps > 0)
    if bool(wrong.any()):
        row = int(torch.nonzero(wrong.any(-1)).flatten()[0])
        side, other = ("left", "right") if decoder else ("right", "left")
        why = ("so every row's last token sits in the last column" if decoder else
               "since the encoder numbers positions by column")
        raise ValueError(f"attention_mask row {row} has padding on the {other} (or in the middle): "
                         f"{'a decoder' if decoder else 'an encoder-decoder source'} needs {side} padding, {why}; "
                         f"tokenize with padding_side='{side}'")
    real = input_ids[mask.bool()]
    if bool((real < 0).any()) or bool((real >= cfg.vocab_size).any()):
        raise ValueError(f"input_ids hold token ids in [{int(real.min())}, {int(real.max())}] but the model's "
                         f"vocabulary is [0, {cfg.vocab_size}); was the prompt made by another tokenizer?")

    limit = context_limit(cfg)
    what = "prompt" if decoder else "source"
    # positions needed: a decoder's prompt and all new tokens but the last; a source, and the decoder's inputs
    room = limit - max_new_tokens + 1 if decoder else limit
    if truncate and room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{limit} positions (position.max_seq_len); lower max_new_tokens to {limit} or less")
    if truncate and int(lengths.max()) > room:
        # left-padded prompts keep their last columns, right-padded sources their first
        keep = slice(T - room, T) if decoder else slice(0, room)
        input_ids, mask = input_ids[:, keep], mask[:, keep]
        lengths = mask.sum(-1)
    longest = int(lengths.max()) if decoder else input_ids.shape[1]
    hint = "shorten the prompt or pass truncate_prompt=True (CLI: --truncate) to keep its last tokens" if decoder \
        else "shorten the source or pass truncate_prompt=True (CLI: --truncate) to keep its first tokens"
    if longest > limit:
        raise ValueError(f"the {what} has {longest} tokens but the model's context holds {limit} positions "
                         f"(position.max_seq_len); {hint}")
    needed = longest + max_new_tokens - 1 if decoder else max_new_tokens
    if needed > limit:
        fit = limit - longest + 1 if decoder else limit
        raise ValueError(f"the {what} of {longest} tokens plus max_new_tokens={max_new_tokens} needs {needed} "
                         f"positions but the model's context holds {limit} (position.max_seq_len); lower "
                         f"max_new_tokens to {fit}" + (f" or {hint}" if decoder and room >= 1 else ""))
    return input_ids, mask


def _check_prompt(cfg: ModelConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  max_new_tokens: int) -> torch.Tensor:
    """`prepare_prompt` without truncation: validate the batch and return its mask (B, T)."""
    return prepare_prompt(cfg, input_ids, attention_mask, max_new_tokens)[1]


@dataclass
class GenerationStep:
    """What one decoding step produced, for the B rows of the batch.

    tokens (B,): the token each row chose; a row finished at an earlier step gets the pad id.
    finished (B,) bool: rows that are done after this step (a stop id or a stop string; running out of
        max_new_tokens is the end of the stream, not a flag).
    logprobs (B,): with logprobs=True, log p of each chosen token (see `sampling.token_logprobs`); 0 for the
        pads of finished rows.
    top_ids, top_logprobs (B, k): with top_logprobs=k, the k most likely tokens and their log p, most likely
        first; pad id and 0 for finished rows.
    text: with a tokenizer, each row's new text (possibly ""): decoded incrementally, never half a character,
        ending before a stop string; the last step of a row (or of the stream) also holds its held-back text.
    """

    step: int
    tokens: torch.Tensor
    finished: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    text: list[str] | None = None


def stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer: Tokenizer | None = None,
    skip_special_tokens: bool = True,
    pad_token_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    decoder_start_token_id: int | None = None,
    use_cache: bool = True,
    cache: str = "auto",
    logprobs: bool = False,
    top_logprobs: int = 0,
    truncate_prompt: bool = False,
) -> Iterator[GenerationStep]:
    """Decode step by step: an iterator of `GenerationStep`s, one per new token column (at most max_new_tokens).

    Arguments as in `generate`, plus:
    tokenizer: decode each row's new tokens into `step.text` (special tokens skipped unless
        skip_special_tokens=False). Needed for stop_strings.
    stop_strings: a row stops at the token that completes one of these strings in its generated text (a
        string may span several tokens and start inside one); its text ends right before the string (as in
        the OpenAI API) while its tokens include the completing one (as Hugging Face's `stop_strings`).
    logprobs / top_logprobs=k: fill `step.logprobs` / `step.top_ids` and `step.top_logprobs`.
    truncate_prompt: cut prompts longer than the context allows instead of raising (see `prepare_prompt`).

    The arguments are checked when `stream` is called; the model runs in eval mode without gradients while
    the iterator runs, and its mode is restored when the iterator ends or is closed.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty)
    cfg: ModelConfig = model.config
    if cfg.arch not in ("decoder", "encoder_decoder"):
        raise ValueError(f"generate needs a decoder or encoder-decoder language model, not arch={cfg.arch!r}")
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache={cache!r} is not a KV cache kind; valid: {', '.join(CACHE_KINDS)}")
    strings = check_stop_strings(stop_strings)
    if strings and tokenizer is None:
        raise ValueError(f"stop_strings={strings!r} need the tokenizer to read the generated text; pass "
                         "tokenizer=Tokenizer.load(...)")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= cfg.vocab_size:
        raise ValueError(f"top_logprobs={top_logprobs!r} must be an integer in [0, vocab_size={cfg.vocab_size}] "
                         "(0 turns it off)")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    input_ids, mask = prepare_prompt(cfg, input_ids, attention_mask, max_new_tokens, truncate_prompt)
    input_ids = input_ids.long().masked_fill(mask == 0, 0)  # pad slots may hold anything (-100, ...)
    B = input_ids.shape[0]
    stop_ids = _id_list(cfg.eos_token_id if eos_token_id is None else eos_token_id) + _id_list(stop_token_ids)
    fill = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if fill is None:
        fill = stop_ids[0] if stop_ids else 0  # a row that stops on a string alone is filled with id 0
    start = decoder_start_id(cfg, decoder_start_token_id) if cfg.arch == "encoder_decoder" else None
    texts = None if tokenizer is None else [TextStream(tokenizer, strings, skip_special_tokens) for _ in range(B)]
    run = _Run(model=model, input_ids=input_ids, mask=mask, max_new_tokens=max_new_tokens, params=params,
               stop_ids=stop_ids, fill=fill, generators=make_generators(seed, B, device), start_id=start,
               use_cache=use_cache, cache=cache, logprobs=logprobs, top_logprobs=top_logprobs, texts=texts)
    return _steps(run)


@dataclass
class _Run:
    """Everything `_steps` needs, validated by `stream`."""

    model: nn.Module
    input_ids: torch.Tensor  # (B, T) prompt with pads set to 0
    mask: torch.Tensor  # (B, T)
    max_new_tokens: int
    params: SamplingParams
    stop_ids: list[int]
    fill: int
    generators: list[torch.Generator] | None
    start_id: int | None  # encoder-decoders only
    use_cache: bool
    cache: str  # the KV cache kind (session.py): auto, static, dynamic or sliding
    logprobs: bool
    top_logprobs: int
    texts: list[TextStream] | None


@torch.no_grad()  # on a generator, torch disables gradients around each step only, not in the caller
def _steps(run: _Run) -> Iterator[GenerationStep]:
    model, input_ids, mask, params, N = run.model, run.input_ids, run.mask, run.params, run.max_new_tokens
    if N == 0:
        return
    B, device = input_ids.shape[0], input_ids.device
    was_training = model.training
    model.eval()
    try:
        if run.start_id is None:
            session = DecoderSession(model, input_ids, mask, max_new_tokens=N, use_cache=run.use_cache,
                                     cache=run.cache)
            context, context_mask = input_ids, mask  # what the repetition penalty looks back on
        else:
            session = EncoderDecoderSession(model, input_ids, mask, max_new_tokens=N, use_cache=run.use_cache,
                                            cache=run.cache, start_id=run.start_id)
            context, context_mask = session.ids, torch.ones_like(session.ids)
        logits = session.prefill()  # (B, V)
        V = logits.shape[-1]
        seen = counts = None
        if params.penalised:
            seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            rows, cols = context_mask.nonzero(as_tuple=True)  # real tokens only, never the pads
            seen[rows, context[rows, cols]] = True
            counts = torch.zeros(B, V, dtype=torch.float32, device=device)
        stop = torch.tensor(run.stop_ids, dtype=torch.long, device=device)
        can_stop = bool(run.stop_ids) or run.texts is not None
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(N):
            nxt = choose_tokens(logits, params, seen=seen, counts=counts, generators=run.generators)  # (B,)
            done_before = finished
            out = GenerationStep(step=step, tokens=nxt, finished=finished)
            if run.logprobs:
                out.logprobs = token_logprobs(logits, nxt).masked_fill(done_before, 0.0)
            if run.top_logprobs:
                ids, lps = top_logprobs(logits, run.top_logprobs)  # (B, k)
                out.top_ids = ids.masked_fill(done_before[:, None], run.fill)
                out.top_logprobs = lps.masked_fill(done_before[:, None], 0.0)
            if can_stop:
                nxt = nxt.masked_fill(done_before, run.fill)
                finished = done_before | torch.isin(nxt, stop)
            last = step == N - 1
            if run.texts is not None:
                finished, out.text = _advance_text(run.texts, nxt, done_before, finished, last)
            out.tokens, out.finished = nxt, finished
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
                counts[torch.arange(B, device=device), nxt] += 1
            yield out
            if last or (can_stop and bool(finished.all())):
                break
            logits = session.step(nxt)
    finally:
        model.train(was_training)


def _advance_text(texts: list[TextStream], tokens: torch.Tensor, done_before: torch.Tensor, stopped: torch.Tensor,
                  last: bool) -> tuple[torch.Tensor, list[str]]:
    """Feed each running row's token to its TextStream. A row that completes a stop string finishes; a row
    that finishes (stopped: a stop id, whose own text is left out), or every row at the last step, releases
    the text it held back. Returns (finished (B,), text deltas)."""
    finished, deltas = stopped.clone(), []
    for b, (token, was_done, stop_id) in enumerate(zip(tokens.tolist(), done_before.tolist(), stopped.tolist())):
        if was_done:
            deltas.append("")
            continue
        delta, hit = ("", False) if stop_id else texts[b].push(token)
        finished[b] = stop_id or hit
        if stop_id or (last and not hit):
            delta += texts[b].flush()
        deltas.append(delta)
    return finished, deltas


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    decoder_start_token_id: int | None = None,
    use_cache: bool = True,
    cache: str = "auto",
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    stop_strings: Sequence[str] = (),
    tokenizer: Tokenizer | None = None,
    truncate_prompt: bool = False,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    draft_model: nn.Module | None = None,
    prompt_lookup: int | None = None,
    num_draft_tokens: int = 4,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Continue each prompt row; returns the new token ids (B, N), N <= max_new_tokens.

    model: a `DecoderLM` or `EncoderDecoderLM` (what `lmforge.load` / `build_model` return); it runs in
        eval mode (its mode is restored afterwards), on the device and dtype of its parameters.
    input_ids (B, T): the prompts (decoders) or sources (encoder-decoders). Prompts of different lengths:
        pad decoders' prompts on the LEFT and encoder-decoders' sources on the RIGHT, with attention_mask
        (B, T) 0 on the pads; padded rows then give the tokens they give alone.
    temperature: 0 is greedy decoding; top_k / top_p / min_p / penalties: see `sampling.SamplingParams`.
    eos_token_id: None takes the config's eos_token_id; pass [] to never stop on it. stop_token_ids: more
        ids that end a row. A finished row (its last new token is a stop id) emits `pad_token_id` (None:
        the config's pad id, else the first eos / stop id) until every row is done, which ends the loop;
        so N < max_new_tokens only when every row stopped.
    stop_strings, tokenizer: a row also ends at the token that completes one of these strings in its decoded
        output (spanning tokens or not); the ids include that token, so decoding them shows the string
        (`stream` gives the text cut before it).
    seed: an int seeds one `torch.Generator` for the batch; a list seeds one per row; None uses torch's
        global RNG. Greedy decoding draws nothing.
    decoder_start_token_id: encoder-decoders only; None takes the config's (see `decoder_start_id`).
    use_cache: False recomputes the whole sequence at every step: the slow reference the KV-cached path
        is tested against (same greedy tokens).
    cache: the KV cache kind (`lmforge.nn.kv_cache`): "static" (pre-allocated for prompt + max_new_tokens),
        "dynamic" (grows), "sliding" (a ring buffer of the attention window, for sliding-window models) or
        "auto" (sliding for sliding-window decoders, else static).
    return_logprobs: also return (B, N) fp32 log-probabilities of the chosen tokens under the model's
        distribution (log_softmax of the raw logits, before penalties, temperature and truncation);
        0 for the pad tokens of finished rows.
    top_logprobs: k > 0 returns (new_ids, logprobs, top_ids, top_logprobs), the last two (B, N, k): the k
        most likely tokens at each step and their log-probabilities (same distribution), most likely first.
    truncate_prompt: keep the last tokens of a prompt (the first of a source) that does not fit the context
        with max_new_tokens, instead of raising (see `prepare_prompt`).

    num_beams > 1: beam search (`beam.beam_search`, Hugging Face's rules) with length_penalty, early_stopping
        and num_return_sequences; returns (B * num_return_sequences, N) ids, best first per prompt, padded
        with the pad id. Beam search is deterministic: sampling settings other than the defaults (or 0) and
        the options for sampled paths (logprobs, stop strings, truncation) are refused.
    draft_model / prompt_lookup=n: speculative decoding (`speculative.speculative_generate`) with a draft
        model or n-gram prompt lookup proposing num_draft_tokens tokens per target call; one prompt (B = 1);
        greedy gives exactly the tokens of plain greedy decoding, sampling keeps the model's distribution.
        Call `speculative_generate` directly for the acceptance statistics.

    Errors: an empty prompt, a prompt longer than the context (position.max_seq_len), ids outside the
    vocabulary, wrong-side padding and invalid sampling values raise ValueError naming the value.
    """
    if num_beams != 1 or draft_model is not None or prompt_lookup is not None:
        if num_beams != 1 and (draft_model is not None or prompt_lookup is not None):
            raise ValueError(f"num_beams={num_beams} and speculative decoding (draft_model / prompt_lookup) do not "
                             "combine; choose one")
        unsupported = {"return_logprobs": return_logprobs, "top_logprobs": top_logprobs,
                       "stop_strings": tuple(stop_strings), "stop_token_ids": tuple(stop_token_ids),
                       "truncate_prompt": truncate_prompt}
        unsupported = {k: v for k, v in unsupported.items() if v}
        if unsupported:
            what = "beam search" if num_beams != 1 else "speculative decoding"
            raise ValueError(f"{what} does not support {unsupported}; drop them, or use plain decoding "
                             "(num_beams=1, no draft_model / prompt_lookup)")
        if num_beams != 1:
            return _beam(model, input_ids, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                         frequency_penalty, presence_penalty, use_cache=use_cache, seed=seed, num_beams=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping,
                         num_return_sequences=num_return_sequences, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, attention_mask=attention_mask,
                         decoder_start_token_id=decoder_start_token_id)
        from lmforge.generate.speculative import speculative_generate

        new_ids, _ = speculative_generate(
            model, input_ids, max_new_tokens=max_new_tokens, draft_model=draft_model, prompt_lookup=prompt_lookup,
            num_draft_tokens=num_draft_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, eos_token_id=eos_token_id, seed=seed, attention_mask=attention_mask)
        return new_ids
    steps = list(stream(
        model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, eos_token_id=eos_token_id, stop_token_ids=stop_token_ids,
        stop_strings=stop_strings, tokenizer=tokenizer, pad_token_id=pad_token_id, seed=seed,
        attention_mask=attention_mask, decoder_start_token_id=decoder_start_token_id, use_cache=use_cache,
        cache=cache, logprobs=return_logprobs or top_logprobs > 0, top_logprobs=top_logprobs,
        truncate_prompt=truncate_prompt))
    B = input_ids.shape[0]
    device = next(model.parameters()).device
    if not steps:  # max_new_tokens == 0
        empty = torch.zeros(B, 0, dtype=torch.long, device=device)
        if top_logprobs:
            return empty, empty.float(), empty[..., None].expand(B, 0, top_logprobs), \
                empty.float()[..., None].expand(B, 0, top_logprobs)
        return (empty, empty.float()) if return_logprobs else empty
    new_ids = torch.stack([s.tokens for s in steps], dim=1)  # (B, N)
    if top_logprobs:
        return (new_ids, torch.stack([s.logprobs for s in steps], dim=1),
                torch.stack([s.top_ids for s in steps], dim=1), torch.stack([s.top_logprobs for s in steps], dim=1))
    if return_logprobs:
        return new_ids, torch.stack([s.logprobs for s in steps], dim=1)
    return new_ids


def _beam(model, input_ids, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
          frequency_penalty, presence_penalty, *, use_cache, seed, **beam_args) -> torch.Tensor:
    """`generate(num_beams > 1)`: refuse sampling settings (beam search ranks the model's own log-probs)."""
    from lmforge.generate.beam import beam_search

    sampling = {"temperature": (temperature, (0.0, 1.0)), "top_k": (top_k, (0,)), "top_p": (top_p, (1.0,)),
                "min_p": (min_p, (0.0,)), "repetition_penalty": (repetition_penalty, (1.0,)),
                "frequency_penalty": (frequency_penalty, (0.0,)), "presence_penalty": (presence_penalty, (0.0,)),
                "seed": (seed, (None,))}
    for name, (value, neutral) in sampling.items():
        if value not in neutral:
            raise ValueError(f"{name}={value!r} has no meaning for beam search (num_beams="
                             f"{beam_args['num_beams']}), which keeps the most likely hypotheses; leave it at "
                             f"{neutral[0]!r} or sample with num_beams=1")
    return beam_search(model, input_ids, max_new_tokens=max_new_tokens, use_cache=use_cache, **beam_args).sequences
