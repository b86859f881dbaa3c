"""Choosing the next token from logits: penalties, temperature, truncation, greedy or seeded sampling.

Everything here is a pure function of (logits, settings, token counts) -> logits or tokens; the decoding
loop (engine.py) owns the state. Shapes: logits (B, V) for the last position of each row.

The order follows Hugging Face's logits processors, so the same settings mean the same thing:

    penalties (repetition, frequency, presence) -> temperature -> top-k -> top-p -> min-p -> sample

Greedy decoding (temperature == 0) takes the argmax of the penalised logits; top-k, top-p and min-p
never remove the most likely token, so they do not change it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings, validated once. Defaults change nothing: plain sampling at temperature 1."""

    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # nucleus: the smallest set of tokens with probability mass >= top_p; 1: off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0: off
    repetition_penalty: float = 1.0  # CTRL; > 1 discourages tokens already in the prompt or output
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token occurred in the output

    def __post_init__(self) -> None:
        def bad(name: str, value, rule: str) -> ValueError:
            return ValueError(f"{name}={value!r} is invalid: {rule}")

        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise bad("temperature", t, "it must be a finite number >= 0 (0 means greedy decoding)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "it must be an integer >= 0 (0 turns top-k off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "it must lie in (0, 1] (1 turns top-p off)")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "it must lie in [0, 1] (0 turns min-p off)")
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or not 0.0 < r < math.inf:
            raise bad("repetition_penalty", r, "it must be a finite number > 0 (1 turns it off; CTRL used 1.2)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, value, "it must be a finite number (0 turns it off; OpenAI allows [-2, 2])")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# -- logits processors: (B, V) -> (B, V) -----------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, §4.1): tokens already generated get their logit divided by
    `penalty`. seen (B, V) bool. The paper divides every logit; dividing a negative logit would make the
    token *more* likely, so (as Hugging Face and vLLM do) negative logits are multiplied instead."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                                     presence: float) -> torch.Tensor:
    """OpenAI's penalties: logit_j - counts_j * frequency - [counts_j > 0] * presence, counts (B, V) the
    occurrences of token j in the output so far."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """p ∝ exp(logit / T): T < 1 sharpens, T > 1 flattens. T must be > 0 (0 is greedy, handled by the caller)."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (Fan et al. 2018), -inf elsewhere; ties at the k-th value are kept."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020, eq. 3): keep the smallest set of most likely tokens whose
    probability mass is >= p, i.e. every token whose more likely predecessors hold < p in total."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the most likely token always stays (mass_before = 0 < p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with p_j >= min_p * max_j p_j, a cut-off that scales
    with the model's confidence. In log space: logit_j >= max logit + log(min_p)."""
    if min_p == 0.0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def process_logits(logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """The whole chain in fp32: penalties, then (when sampling) temperature, top-k, top-p and min-p.

    seen (B, V) bool: tokens in the prompt or output (repetition penalty); counts (B, V): occurrences in
    the output (frequency / presence penalties). Removed tokens hold -inf."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        logits = apply_frequency_presence_penalty(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


# -- choosing ---------------------------------------------------------------------------------------------


def make_generators(seed: int | Sequence[int] | None, batch: int,
                    device: torch.device | str = "cpu") -> list[torch.Generator] | None:
    """None: torch's global RNG. An int: one generator for the whole batch. A sequence: one seed per row,
    so a row's samples do not depend on the other rows of its batch."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return [torch.Generator(device=device).manual_seed(seed)]
    seeds = list(seed)
    if len(seeds) != batch or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seed={seed!r} must be an int or one int per row ({batch} rows)")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def sample(probs: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Draw one token per row from probs (B, V): argmax(p_j / E_j) with E_j ~ Exp(1) i.i.d. picks j with
    probability p_j (the exponential race, equivalent to the Gumbel-max trick), without the host sync of
    torch.multinomial. Returns (B,)."""
    noise = torch.empty_like(probs)
    if generators is None:
        noise.exponential_(1.0)
    elif len(generators) == 1:
        noise.exponential_(1.0, generator=generators[0])
    else:
        for row, g in zip(noise, generators):
            row.exponential_(1.0, generator=g)
    # A draw of exactly 0 would make 0 / 0 = NaN, which argmax picks: keep E_j > 0.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def choose_tokens(logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): greedy when params.temperature == 0, else a sample."""
    processed = process_logits(logits, params, seen=seen, counts=counts)
    if params.greedy:
        return processed.argmax(dim=-1)
    return sample(torch.softmax(processed, dim=-1), generators)


# -- log-probabilities ------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution, log_softmax of the raw logits (B, V) in fp32, before
    penalties, temperature and truncation (what the model believes, not what the sampler drew from). (B,)"""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row and their log-probabilities (same distribution as
    `token_logprobs`), most likely first: ids (B, k), logprobs (B, k). Ties keep torch.topk's order."""
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
    return ids, values
