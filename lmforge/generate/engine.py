"""`generate`: token ids in, new token ids out, for decoder-only and encoder-decoder models.

    new_ids = lmforge.generate(model, input_ids, max_new_tokens=32, temperature=0.0)            # greedy
    new_ids = lmforge.generate(model, input_ids, max_new_tokens=32, temperature=0.0, use_cache=False)
    new_ids, logprobs = lmforge.generate(model, ids, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0,
                                         attention_mask=mask, return_logprobs=True)

The loop is the same for every family and every decoding rule:

    logits = session.prefill()                        # the prompt (decoder) or start token (encoder-decoder)
    repeat: token = choose(logits); stop rows that emitted a stop id; logits = session.step(token)

`session.py` runs the model (positions, masks, KV cache); `sampling.py` turns logits into tokens. Beam
search and speculative decoding will reuse both pieces with their own loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.generate.sampling import SamplingParams, choose_tokens, make_generators
from lmforge.generate.session import DecoderSession, EncoderDecoderSession


def _id_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def context_limit(cfg: ModelConfig) -> int | None:
    """The most positions the model can number: learned position tables end at position.max_seq_len.
    RoPE, ALiBi, relative and sinusoidal positions have no hard end (quality past the trained length
    is another matter), so nothing is enforced for them."""
    return cfg.position.max_seq_len if cfg.position.kind == "learned" else None


def decoder_start_id(cfg: ModelConfig, override: int | None = None) -> int:
    """The encoder-decoder's first decoder input: the override, else the config's decoder_start_token_id
    where it has one, else the pad id (T5 and Marian start from <pad>; BART starts from </s> and needs the
    override or a decoder_start_token_id in its config)."""
    for value in (override, getattr(cfg, "decoder_start_token_id", None), cfg.pad_token_id):
        if value is not None:
            return int(value)
    raise ValueError("this encoder-decoder's config names no decoder_start_token_id or pad_token_id; pass "
                     "generate(..., decoder_start_token_id=ID) (T5 and Marian: the pad id; BART: the eos id)")


def _check_prompt(cfg: ModelConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  max_new_tokens: int) -> torch.Tensor:
    """Validate the prompt batch and return its mask (B, T) of 1 for real tokens."""
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
    if limit is not None:
        longest = int(lengths.max()) if decoder else T
        what = "prompt" if decoder else "source"
        if longest > limit:
            raise ValueError(f"the {what} has {longest} tokens but the model's context holds {limit} positions "
                             "(position.max_seq_len of its learned position table); shorten the prompt")
        needed = longest + max_new_tokens - 1 if decoder else max_new_tokens
        if needed > limit:
            room = limit - longest + 1 if decoder else limit
            raise ValueError(f"the {what} of {longest} tokens plus max_new_tokens={max_new_tokens} needs {needed} "
                             f"positions but the model's context holds {limit} (position.max_seq_len); lower "
                             f"max_new_tokens to {room} or shorten the prompt")
    return mask


@torch.no_grad()
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
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
    seed: an int seeds one `torch.Generator` for the batch; a list seeds one per row; None uses torch's
        global RNG. Greedy decoding draws nothing.
    decoder_start_token_id: encoder-decoders only; None takes the config's (see `decoder_start_id`).
    use_cache: False recomputes the whole sequence at every step: the slow reference the KV-cached path
        is tested against (same greedy tokens).
    return_logprobs: also return (B, N) fp32 log-probabilities of the chosen tokens under the model's
        distribution (log_softmax of the raw logits, before penalties, temperature and truncation);
        0 for the pad tokens of finished rows.

    Errors: an empty prompt, a prompt longer than a learned position table, ids outside the vocabulary,
    wrong-side padding and invalid sampling values raise ValueError naming the value.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty)
    cfg: ModelConfig = model.config
    if cfg.arch not in ("decoder", "encoder_decoder"):
        raise ValueError(f"generate needs a decoder or encoder-decoder language model, not arch={cfg.arch!r}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    mask = _check_prompt(cfg, input_ids, attention_mask, max_new_tokens)
    input_ids = input_ids.long().masked_fill(mask == 0, 0)  # pad slots may hold anything (-100, ...)
    B = input_ids.shape[0]
    stop_ids = _id_list(cfg.eos_token_id if eos_token_id is None else eos_token_id) + _id_list(stop_token_ids)
    fill = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if fill is None:
        fill = stop_ids[0] if stop_ids else 0  # with no stop ids no row ever finishes, so no fill is emitted
    generators = make_generators(seed, B, device)
    empty = torch.zeros(B, 0, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return (empty, empty.float()) if return_logprobs else empty

    was_training = model.training
    model.eval()
    try:
        if cfg.arch == "decoder":
            session = DecoderSession(model, input_ids, mask, max_new_tokens=max_new_tokens, use_cache=use_cache)
            context, context_mask = input_ids, mask  # what the repetition penalty looks back on
        else:
            start = decoder_start_id(cfg, decoder_start_token_id)
            session = EncoderDecoderSession(model, input_ids, mask, max_new_tokens=max_new_tokens,
                                            use_cache=use_cache, start_id=start)
            context, context_mask = session.ids, torch.ones_like(session.ids)
        logits = session.prefill()  # (B, V)
        V = logits.shape[-1]
        seen = counts = None
        if params.penalised:
            seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            rows, cols = context_mask.nonzero(as_tuple=True)  # real tokens only, never the pads
            seen[rows, context[rows, cols]] = True
            counts = torch.zeros(B, V, dtype=torch.float32, device=device)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, logprobs = [], []
        for step in range(max_new_tokens):
            nxt = choose_tokens(logits, params, seen=seen, counts=counts, generators=generators)  # (B,)
            if return_logprobs:
                lp = torch.log_softmax(logits.float(), dim=-1).gather(1, nxt[:, None])[:, 0]
                logprobs.append(lp.masked_fill(finished, 0.0))
            if stop_ids:
                nxt = nxt.masked_fill(finished, fill)
                finished = finished | torch.isin(nxt, stop)
            tokens.append(nxt)
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
                counts[torch.arange(B, device=device), nxt] += 1
            if step == max_new_tokens - 1 or (stop_ids and bool(finished.all())):
                break
            logits = session.step(nxt)
    finally:
        model.train(was_training)
    new_ids = torch.stack(tokens, dim=1)  # (B, N)
    return (new_ids, torch.stack(logprobs, dim=1)) if return_logprobs else new_ids
