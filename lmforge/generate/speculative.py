"""Speculative decoding: a cheap proposer drafts k tokens, the target model checks them in one forward pass.

    new_ids, stats = speculative_generate(model, ids, max_new_tokens=64, draft_model=small, temperature=0.0)
    new_ids, stats = speculative_generate(model, ids, max_new_tokens=64, prompt_lookup=3, num_draft_tokens=8)
    print(stats.acceptance_rate, stats.tokens_per_target_call)

One round (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", Algorithm 1;
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2):

    draft x_1..x_m ~ q                                  # a draft model (m forward calls), or n-gram lookup
    p_1..p_{m+1} = target(context + x_1..x_m)           # ONE target call scores every prefix
    accept x_i while u_i < p_i(x_i) / q_i(x_i)          # u_i ~ U(0, 1): accepted with min(1, p/q)
    first rejection at i: emit y ~ norm(max(0, p_i - q_i))   # the "modified rejection" residual
    all m accepted: emit a bonus y ~ p_{m+1}

Every emitted token is distributed exactly as the target's own sample (Leviathan et al. Appendix A.1;
Chen et al. Theorem 1), so a round yields 1..m+1 tokens for one target call. p and q are the target's and
the draft's distributions after the same `process_logits` (temperature, top-k, top-p, min-p): the theorem
holds for any q, so truncating the draft too only changes the acceptance rate. Penalties are not supported
(they make p depend on the tokens accepted within the round).

Greedy decoding (temperature 0) keeps drafted tokens while they equal the target's argmax and emits the
target's argmax at the first mismatch (or as the bonus): the tokens of `generate(model, ids, temperature=0)`.
(Both take argmaxes of fp32 logits; the target here scores m + 1 positions per call instead of one, which
can differ in the last bits, so an exact logit tie could break differently; random-weight tests never hit one.)

Prompt lookup (Saxena 2023, "Prompt Lookup Decoding", the algorithm behind Hugging Face's
`prompt_lookup_num_tokens`) drafts without a second model: find the last n tokens earlier in the sequence
and propose the tokens that followed them. It is a deterministic proposal, q = one-hot(x), so the rule
above becomes: accept x with probability p(x); on rejection sample from p with x removed.
As in Saxena's reference code, n backs off from `prompt_lookup` to 1 and the EARLIEST match with a
continuation wins.

Departures from the papers: the number of drafted tokens shrinks near max_new_tokens (never past it) and
for prompt lookup to the continuation found; drafting stops early at a stop id. Batch 1 only: rows would
accept different numbers of tokens and need ragged caches.

Shapes: V the target's vocabulary, m the tokens drafted in a round; p (m + 1, V), q (m, V).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.generate.engine import _check_prompt, context_limit
from lmforge.generate.sampling import SamplingParams, make_generators, process_logits, sample
from lmforge.nn.kv_cache import KVCache


@dataclass
class SpeculativeStats:
    """What one `speculative_generate` call did. The speed-up over plain decoding is roughly
    tokens_per_target_call when a draft call costs little next to a target call."""

    drafted: int = 0  # draft tokens the target verified
    accepted: int = 0  # of those, the ones the target kept
    target_calls: int = 0  # target forward passes, the prompt's included (plain decoding: one per token)
    draft_calls: int = 0  # draft model forward passes (0 for prompt lookup)
    new_tokens: int = 0  # tokens returned

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted; NaN when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else math.nan


def lookup_draft(seq: Sequence[int], max_ngram: int, num_tokens: int) -> list[int]:
    """Prompt lookup (Saxena 2023): for n = max_ngram..1, find the earliest earlier occurrence of the last n
    tokens of `seq` and return up to `num_tokens` tokens that followed it; [] when nothing matches."""
    L = len(seq)
    if num_tokens == 0 or L < 2:
        return []
    ids = torch.tensor(seq)
    for n in range(min(max_ngram, L - 1), 0, -1):
        windows = ids[:L - 1].unfold(0, n, 1)  # (L - n, n): every n-gram followed by at least one token
        hits = (windows == ids[L - n:]).all(dim=-1).nonzero()
        if hits.numel():
            start = int(hits[0, 0]) + n
            return list(seq[start:start + num_tokens])
    return []


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor,
           generators: list[torch.Generator] | None) -> tuple[int, int]:
    """Modified rejection sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2 and
    Theorem 1, where q names the target and p the draft: the reverse of the notation here).

    p (m + 1, V): the target's probabilities after context + drafted[:i] for i = 0..m; q (m, V): the
    proposal's probabilities of drafted (m,). Returns (n accepted, the token emitted after them)."""
    m = drafted.shape[0]
    u = torch.rand(m, generator=generators[0] if generators else None, device=p.device)  # (m,)
    rows = torch.arange(m, device=p.device)
    p_x, q_x = p[rows, drafted], q[rows, drafted]  # (m,)
    rejected = (u * q_x >= p_x).nonzero()  # u < p/q accepts, i.e. with probability min(1, p/q)
    if rejected.numel() == 0:
        return m, int(sample(p[m:], generators)[0])  # the bonus token
    i = int(rejected[0, 0])
    residual = (p[i] - q[i]).clamp(min=0)  # norm(max(0, p - q)); `sample` needs no normalised input
    if not bool(residual.sum() > 0):
        # p <= q everywhere means p == q up to rounding, and the rejection was a rounding artefact
        residual = p[i]
    return i, int(sample(residual[None], generators)[0])


def _check_pair(cfg: ModelConfig, draft_cfg: ModelConfig | None, draft_model, prompt_lookup,
                num_draft_tokens: int) -> None:
    if cfg.arch != "decoder":
        raise ValueError(f"speculative decoding runs decoder-only models, not arch={cfg.arch!r}; use "
                         "lmforge.generate for encoder-decoders")
    if (draft_model is None) == (prompt_lookup is None):
        raise ValueError("pass exactly one of draft_model (a smaller model with the target's tokenizer) and "
                         f"prompt_lookup (an n-gram size, e.g. 3); got draft_model={type(draft_model).__name__}, "
                         f"prompt_lookup={prompt_lookup!r}")
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 1 (typically 3 to 8)")
    if prompt_lookup is not None and (isinstance(prompt_lookup, bool) or not isinstance(prompt_lookup, int)
                                      or prompt_lookup < 1):
        raise ValueError(f"prompt_lookup={prompt_lookup!r} must be an n-gram size >= 1 (Saxena 2023 uses 3)")
    if draft_cfg is None:
        return
    if draft_cfg.arch != "decoder":
        raise ValueError(f"the draft model must be decoder-only, not arch={draft_cfg.arch!r}")
    V, Vd = cfg.vocab_size, draft_cfg.vocab_size
    # One tokenizer's models may pad their vocabularies differently (Qwen2.5-0.5B: 151936 ids, 7B: 152064;
    # 0.1%). Sizes more than 10% apart come from different tokenizers, whose ids name different tokens (the
    # output would still follow the target's distribution, but almost no draft would be accepted).
    if abs(V - Vd) > 0.1 * V:
        raise ValueError(f"the draft's vocabulary has {Vd} ids but the target's {V}: draft and target must share "
                         "the tokenizer; pick a draft from the target's family")
    if draft_cfg.padded_vocab_size < V:
        raise ValueError(f"the draft embeds {draft_cfg.padded_vocab_size} ids but the target may emit any of {V}, "
                         "which the draft must read back; use a draft whose vocabulary covers the target's")


def _align(logits: torch.Tensor, V: int) -> torch.Tensor:
    """Draft logits (..., Vd) -> (..., V): ids the target lacks are dropped, ids the draft lacks get -inf
    (it never proposes them; the residual then holds all of their target probability)."""
    Vd = logits.shape[-1]
    if Vd >= V:
        return logits[..., :V]
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], V - Vd), -math.inf)], dim=-1)


def _forward(model: nn.Module, cache: KVCache, tokens: list[int]) -> torch.Tensor:
    """Feed tokens after the cached ones; returns the logits (len(tokens), V') and advances the cache."""
    device = cache.k[0].device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, L)
    positions = (cache.pos + torch.arange(len(tokens), device=device))[None]  # (1, L)
    logits = model(ids, positions=positions, cache=cache).logits[0]  # (L, V')
    cache.advance(len(tokens))
    return logits


@torch.no_grad()
def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    draft_model: nn.Module | None = None,
    prompt_lookup: int | None = None,
    num_draft_tokens: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Continue one prompt with speculative decoding; returns (new token ids (1, N), stats), N <= max_new_tokens.

    model: the target, a decoder-only `DecoderLM`. Exactly one proposer: draft_model (a smaller decoder with
        the same tokenizer; vocabularies may differ by padding) or prompt_lookup (the largest n-gram to match).
    input_ids (1, T): one prompt (left padding with attention_mask is stripped).
    num_draft_tokens: k, the tokens proposed per round. temperature 0 is greedy (the tokens of
        `lmforge.generate(..., temperature=0.0)`); top_k / top_p / min_p as in `sampling.SamplingParams`,
        applied to target and draft alike. Penalties raise ValueError (see the module docstring).
    eos_token_id: None takes the target config's; [] never stops. The output ends with the first stop id.
    seed: seeds one `torch.Generator` for drafting, acceptance and resampling; None uses torch's global RNG.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty)
    if params.penalised:
        raise ValueError("speculative decoding does not support repetition / frequency / presence penalties "
                         "(the target's distribution would change with every accepted draft token); use "
                         "lmforge.generate for penalised decoding")
    cfg: ModelConfig = model.config
    draft_cfg = draft_model.config if draft_model is not None else None
    _check_pair(cfg, draft_cfg, draft_model, prompt_lookup, num_draft_tokens)
    if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding continues one prompt at a time, got a batch of {input_ids.shape[0]}; "
                         "call it once per row (input_ids[i:i+1]) or use lmforge.generate for batches")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    mask = _check_prompt(cfg, input_ids, attention_mask, max_new_tokens)
    prompt = input_ids[0][mask[0].bool()].tolist()  # left pads dropped: a lone row needs none
    T = len(prompt)
    if draft_cfg is not None:
        needed, limit = T + max_new_tokens - 2, context_limit(draft_cfg)  # the draft never reads the last token
        if limit is not None and needed > limit:
            raise ValueError(f"the draft model's context holds {limit} positions (position.max_seq_len) but this "
                             f"prompt of {T} tokens plus max_new_tokens={max_new_tokens} needs {needed}; lower "
                             "max_new_tokens or use a draft with a longer context")
    stop_ids = set(_as_list(cfg.eos_token_id if eos_token_id is None else eos_token_id))
    generators = make_generators(seed, 1, device)
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return torch.zeros(1, 0, dtype=torch.long, device=device), stats

    # eval mode (dropout off) while decoding; toggled only where needed, as train() walks every submodule
    training = [module for module in (model, draft_model) if module is not None and module.training]
    for module in training:
        module.eval()
    try:
        # The last committed token is never fed before the next round: T + N - 1 positions suffice.
        length = T + max_new_tokens - 1
        p0 = next(model.parameters())
        cache = KVCache.for_model(cfg, 1, length, dtype=p0.dtype, device=p0.device)
        draft_cache = None
        if draft_model is not None:
            d0 = next(draft_model.parameters())
            draft_cache = KVCache.for_model(draft_cfg, 1, length, dtype=d0.dtype, device=d0.device)
        seq = list(prompt)  # prompt + committed new tokens
        while len(seq) - T < max_new_tokens:
            room = max_new_tokens - (len(seq) - T) - 1  # drafts beyond this could never be emitted
            k = min(num_draft_tokens, room)
            if draft_model is None:
                drafted, q = lookup_draft(seq, prompt_lookup, k), None
            else:
                drafted, q = _draft(draft_model, draft_cache, seq, k, cfg.vocab_size, device, params,
                                    generators, stop_ids, stats)
            m = len(drafted)
            logits = _forward(model, cache, seq[cache.pos:] + drafted)[-(m + 1):]  # (m + 1, V)
            stats.target_calls += 1
            target = process_logits(logits, params)  # (m + 1, V)
            drafted_t = torch.tensor(drafted, dtype=torch.long, device=device)  # (m,)
            if params.greedy:
                best = target.argmax(dim=-1)  # (m + 1,)
                mismatch = (drafted_t != best[:m]).nonzero()
                n = int(mismatch[0, 0]) if mismatch.numel() else m
                nxt = int(best[n])
            else:
                p = torch.softmax(target, dim=-1)
                if q is None:  # prompt lookup: a deterministic proposal (or nothing drafted)
                    q = torch.nn.functional.one_hot(drafted_t, p.shape[-1]).to(p.dtype)  # (m, V)
                n, nxt = verify(p, q, drafted_t, generators)
            stats.drafted += m
            stats.accepted += n
            seq += drafted[:n] + [nxt]
            cache.crop(len(seq) - 1)  # keep context + accepted drafts; nxt is fed next round
            if draft_cache is not None:
                draft_cache.crop(min(draft_cache.pos, len(seq) - 1))
            if stop_ids & set(seq[len(seq) - n - 1:]):
                break
    finally:
        for module in training:
            module.train()
    new = seq[T:]
    for i, token in enumerate(new):
        if token in stop_ids:
            new = new[:i + 1]
            break
    stats.new_tokens = len(new)
    return torch.tensor([new], dtype=torch.long, device=device), stats


def _draft(draft_model: nn.Module, cache: KVCache, seq: list[int], k: int, V: int, device: torch.device,
           params: SamplingParams, generators: list[torch.Generator] | None, stop_ids: set[int],
           stats: SpeculativeStats) -> tuple[list[int], torch.Tensor | None]:
    """Propose up to k tokens with the draft model, one call each (the first also catches the draft's cache up
    with `seq`); returns the tokens and, when sampling, their distributions q (m, V)."""
    drafted, qs = [], []
    pending = seq[cache.pos:]
    for _ in range(k):
        logits = _align(_forward(draft_model, cache, pending)[-1:], V).to(device)  # (1, V)
        logits = process_logits(logits, params)
        stats.draft_calls += 1
        if params.greedy:
            token = int(logits.argmax(dim=-1)[0])
        else:
            probs = torch.softmax(logits, dim=-1)
            token = int(sample(probs, generators)[0])
            qs.append(probs)
        drafted.append(token)
        if token in stop_ids or len(drafted) == k:
            break  # the last draft is never fed: its successor would not be verified this round
        pending = [token]
    return drafted, (torch.cat(qs) if qs else None)


def _as_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]
