"""Beam search for decoder-only and encoder-decoder models, step for step the same as Hugging Face's.

    out = beam_search(model, input_ids, num_beams=4, max_new_tokens=32, eos_token_id=2, attention_mask=mask)
    out.sequences  # (B * num_return_sequences, N) new ids, best first within each prompt, padded with pad id
    out.scores     # (B * num_return_sequences,) sum of log-probabilities / length ** length_penalty

Beam search keeps the K partial outputs with the highest total log-probability and extends each by every
token, keeping the best K again (Graves 2012, "Sequence Transduction with Recurrent Neural Networks", sec. 3.2;
Sutskever et al. 2014, "Sequence to Sequence Learning with Neural Networks", sec. 3.1). A hypothesis that
emits an end-of-sequence id leaves the beam for a pool of K finished ones, ranked by the length-normalised
score of Wu et al. 2016 ("Google's Neural Machine Translation System", eq. 14):

    score(Y) = log P(Y | X) / lp(Y),    GNMT: lp(Y) = (5 + |Y|) ** alpha / 6 ** alpha;  here: |Y| ** alpha

Departures from the papers, all taken from transformers' `GenerationMixin._beam_search` (v5) so that the same
settings give the same sequences and `scores == sequences_scores`:
- lp is Hugging Face's plain |Y| ** length_penalty, without GNMT's +5 / 6 smoothing nor its coverage penalty;
  alpha = 0 ranks by raw log-probability, alpha > 0 favours longer outputs, alpha < 0 shorter ones.
- |Y| counts the NEW tokens only, the end-of-sequence token included, for decoders and encoder-decoders alike
  (transformers subtracts the decoder prompt length since PR #27351, late 2023; before it, decoder-only models
  counted the prompt too). A hypothesis cut by max_new_tokens has |Y| = max_new_tokens.
- Each step ranks C = max(2, 1 + number of eos ids) * K candidates over all beams (so K stay open even when
  the best ones end), and only candidates ranked within the top K may enter the finished pool.
- Stopping (`early_stopping`): True ends a prompt as soon as K hypotheses have finished. False (the default)
  ends it once the best open beam, normalised by the CURRENT length, cannot beat the worst finished one: a
  heuristic, exact only for length_penalty <= 0. "never" normalises by max_new_tokens when length_penalty > 0
  instead, the exact bound, so it stops only when no open beam can win (the canonical beam search).
- At the last step every open candidate ranked in the top K finishes, so the pool always holds K hypotheses.

Shapes: B prompts, K beams, C candidates, V vocabulary, N new tokens, R returned sequences per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.generate.engine import _check_prompt, decoder_start_id
from lmforge.generate.session import DecoderSession, EncoderDecoderSession

NEG = -1.0e9  # Hugging Face's "impossible" score: added, never assigned, so rankings among losers stay defined


@dataclass
class BeamOutput:
    """The best `num_return_sequences` finished hypotheses of each prompt, best first: rows r * R ... r * R + R - 1
    belong to prompt r."""

    sequences: torch.Tensor  # (B * R, N) new token ids, padded with the pad id after each hypothesis' end
    scores: torch.Tensor  # (B * R,) fp32: sum of log-probabilities / lengths ** length_penalty
    lengths: torch.Tensor  # (B * R,) new tokens in each hypothesis (its eos included); N = lengths.max()


def _check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be an integer >= 1 (1 is greedy decoding)")
    r = num_return_sequences
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= num_beams:
        raise ValueError(f"num_return_sequences={r!r} must be an integer in [1, num_beams={num_beams}]: beam "
                         "search finishes num_beams hypotheses per prompt; raise num_beams to return more")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r} must be a finite number (1: mean log-probability per "
                         "token, 0: total log-probability, > 1 favours longer outputs)")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or 'never' (see beam_search)")


def _eos_ids(cfg: ModelConfig, eos_token_id: int | Sequence[int] | None) -> list[int]:
    value = cfg.eos_token_id if eos_token_id is None else eos_token_id
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else list(value)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size:
            raise ValueError(f"eos_token_id {i!r} must be an integer token id in [0, {cfg.vocab_size}) (the model's "
                             "vocabulary); pass [] to never stop on one")
    return ids


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, M, ...) -> (B, J, ...): per prompt, the beams / candidates `index` (B, J)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.ndim - 2))), dim=1)


@torch.no_grad()
def beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    decoder_start_token_id: int | None = None,
    use_cache: bool = True,
) -> BeamOutput:
    """Beam search over `model` (a `DecoderLM` or `EncoderDecoderLM`); see the module docstring for the rules.

    input_ids (B, T): prompts (decoders, LEFT padded) or sources (encoder-decoders, RIGHT padded), with
        attention_mask (B, T) 0 on the pads, exactly as for `generate`.
    num_beams: K >= 1 open hypotheses per prompt. K = 1 gives greedy decoding's tokens (unless
        early_stopping="never" with length_penalty > 0, which may keep looking past an eos).
    length_penalty, early_stopping: Hugging Face's meaning (module docstring); early_stopping in
        {True, False, "never"}.
    eos_token_id: None takes the config's; [] never finishes a hypothesis before max_new_tokens.
    pad_token_id: fills sequences after a hypothesis' end; None takes the config's pad id, else the first
        eos id. (Hugging Face fills with the eos id when the pad id is 0, a quirk not copied.)
    decoder_start_token_id: encoder-decoders only; None takes the config's (see `decoder_start_id`).
    use_cache: False recomputes the whole sequence at every step (the reference path).
    """
    cfg: ModelConfig = model.config
    if cfg.arch not in ("decoder", "encoder_decoder"):
        raise ValueError(f"beam_search needs a decoder or encoder-decoder language model, not arch={cfg.arch!r}")
    _check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    mask = _check_prompt(cfg, input_ids, attention_mask, max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 for beam search: a hypothesis needs a token")
    input_ids = input_ids.long().masked_fill(mask == 0, 0)
    eos = _eos_ids(cfg, eos_token_id)
    fill = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if fill is None:
        fill = eos[0] if eos else 0  # without eos ids every hypothesis runs to max_new_tokens: nothing to fill
    if isinstance(fill, bool) or not isinstance(fill, int):
        raise TypeError(f"pad_token_id={fill!r} must be an integer token id")
    B, K, N, R = input_ids.shape[0], num_beams, max_new_tokens, num_return_sequences
    C = max(2, 1 + len(eos)) * K
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    in_top_k = torch.arange(C, device=device) < K  # (C,) candidates allowed into the finished pool
    offsets = torch.arange(B, device=device)[:, None] * K  # (B, 1): flat row of each prompt's beam 0

    was_training = model.training
    model.eval()
    try:
        # Each prompt is prefilled once (B rows, not B * K); `reorder` then copies it into its K beams.
        if cfg.arch == "decoder":
            session = DecoderSession(model, input_ids, mask, max_new_tokens=N, use_cache=use_cache)
        else:
            session = EncoderDecoderSession(model, input_ids, mask, max_new_tokens=N, use_cache=use_cache,
                                            start_id=decoder_start_id(cfg, decoder_start_token_id))
        logits = session.prefill().repeat_interleave(K, dim=0)  # (B * K, V)
        session.reorder(torch.arange(B, device=device).repeat_interleave(K))
        V = logits.shape[-1]
        if C > K * V:
            raise ValueError(f"beam search ranks {C} candidates per step but num_beams={K} x vocabulary {V} offers "
                             f"only {K * V}; lower num_beams")

        # Open beams: tokens and summed log-probs. Beams 1.. start at NEG so step 0 expands beam 0 only
        # (all beams hold the same prompt; otherwise the K best would be K copies of one token).
        run_ids = torch.full((B, K, N), fill, dtype=torch.long, device=device)
        run_sum = torch.zeros(B, K, device=device)
        run_sum[:, 1:] = NEG
        # The finished pool: K slots per prompt, sorted best first; empty slots score NEG.
        done_ids = run_ids.clone()
        done_score = torch.full((B, K), NEG, device=device)
        done_len = torch.zeros(B, K, dtype=torch.long, device=device)
        done_real = torch.zeros(B, K, dtype=torch.bool, device=device)  # slot holds a finished hypothesis
        improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # sticky: False once a prompt is settled

        for t in range(N):  # t tokens generated so far; this step chooses token t + 1 of every hypothesis
            logprobs = torch.log_softmax(logits.float(), dim=-1).view(B, K, V) + run_sum[:, :, None]
            cand_sum, flat = torch.topk(logprobs.view(B, K * V), C)  # (B, C) best extensions over all beams
            cand_beam, cand_tok = flat // V, flat % V
            cand_ids = _gather(run_ids, cand_beam)  # (B, C, N)
            cand_ids[:, :, t] = cand_tok
            ends = torch.isin(cand_tok, eos_t) | (t == N - 1)  # (B, C) the candidate's hypothesis is complete

            # Open beams for the next step: the best K candidates that did not end.
            open_sum = cand_sum + ends.float() * NEG
            keep = torch.topk(open_sum, K).indices  # (B, K)
            run_ids, run_sum = _gather(cand_ids, keep), _gather(open_sum, keep)
            parent = _gather(cand_beam, keep) + offsets  # (B, K) flat row each surviving beam extends

            # Finished pool: merge ended top-K candidates (length-normalised) unless the prompt is settled.
            score = cand_sum / (t + 1) ** length_penalty
            full = done_real.all(-1, keepdim=True) & (early_stopping is True)
            entering = ends & in_top_k
            for barred in (full, ~improvable, ~entering):  # added one by one, as HF does
                score = score + barred.float() * NEG
            best = torch.topk(torch.cat([done_score, score], 1), K).indices  # (B, K), stays sorted best first
            done_ids = _gather(torch.cat([done_ids, cand_ids], 1), best)
            done_score = _gather(torch.cat([done_score, score], 1), best)
            done_len = _gather(torch.cat([done_len, torch.full_like(score, t + 1, dtype=torch.long)], 1), best)
            done_real = _gather(torch.cat([done_real, entering], 1), best)

            # Can an open beam still beat the worst finished one? HF's bound: its score so far normalised by
            # the current length, or by max_new_tokens for "never" with length_penalty > 0 (see docstring).
            hypothetical = N if (early_stopping == "never" and length_penalty > 0) else t + 1
            best_open = run_sum[:, :1] / hypothetical**length_penalty  # (B, 1): run_sum is sorted
            worst_done = torch.where(done_real, done_score.min(-1, keepdim=True).values, NEG)  # (B, K)
            improvable = improvable & (best_open > worst_done).any(-1, keepdim=True)
            all_full = bool(done_real.all()) and early_stopping is True
            if not bool(improvable.any()) or all_full or bool(ends.all()):
                break
            session.reorder(parent.flatten())
            logits = session.step(run_ids[:, :, t].flatten())  # (B * K, V)
    finally:
        model.train(was_training)

    lengths = done_len[:, :R].flatten()  # (B * R,)
    sequences = done_ids[:, :R].flatten(0, 1)[:, :int(lengths.max())]  # (B * R, N')
    return BeamOutput(sequences=sequences, scores=done_score[:, :R].flatten(), lengths=lengths)
