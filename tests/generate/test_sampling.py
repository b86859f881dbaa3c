"""Sampling on fixed logits: truncation rules keep exactly the tokens they should, draws follow the
renormalised distribution, seeds reproduce, and the penalties follow their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.generate.sampling import (
    SamplingParams,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    choose_tokens,
    make_generators,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.15, 0.08, 0.03, 0.02])  # sums to 1; order: 1, 3, 4, 5, 0, 6, 2/7
LOGITS = PROBS.log()
DRAWS = 40_000


def _draw(params: SamplingParams, logits: torch.Tensor = LOGITS, seed: int = 0) -> torch.Tensor:
    """DRAWS independent samples from one logits vector: a batch of identical rows."""
    rows = logits.expand(DRAWS, -1)
    return choose_tokens(rows, params, generators=make_generators(seed, DRAWS))


def _frequencies(tokens: torch.Tensor, V: int = len(PROBS)) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).float() / tokens.numel()


def _assert_matches(freq: torch.Tensor, target: torch.Tensor, what: str) -> None:
    """Each frequency within 5 standard errors of its target probability (a false alarm is ~1e-6 likely)."""
    se = (target * (1 - target) / DRAWS).sqrt().clamp(min=1e-9)
    z = ((freq - target).abs() / se).max().item()
    assert z < 5 or (freq - target).abs().max() < 1e-12, f"{what}: frequencies {freq.tolist()} vs {target.tolist()}"


def test_the_frequency_check_catches_a_wrong_distribution():
    tokens = _draw(SamplingParams(top_k=2))
    with pytest.raises(AssertionError):  # top-2 draws are not the full softmax
        _assert_matches(_frequencies(tokens), PROBS, "top_k=2 against the untruncated softmax")
    with pytest.raises(AssertionError):  # nor a 2% shift of mass (8 standard errors) between the top two tokens
        _assert_matches(_frequencies(_draw(SamplingParams())), PROBS + torch.tensor([0, .02, 0, -.02, 0, 0, 0, 0]),
                        "a slightly wrong target")


def test_plain_sampling_follows_the_softmax():
    _assert_matches(_frequencies(_draw(SamplingParams())), PROBS, "temperature 1")


def test_temperature_reshapes_the_distribution_and_tends_to_greedy():
    for t in (0.5, 2.0):
        target = torch.softmax(LOGITS / t, dim=-1)
        _assert_matches(_frequencies(_draw(SamplingParams(temperature=t))), target, f"temperature {t}")
    cold = _draw(SamplingParams(temperature=1e-3))
    assert (cold == LOGITS.argmax()).all(), "temperature -> 0 must approach greedy"
    greedy = choose_tokens(LOGITS[None], SamplingParams(temperature=0.0))
    assert greedy.tolist() == [1]


def test_top_k_never_leaves_the_k_best():
    for k in (1, 2, 3, 5):
        tokens = _draw(SamplingParams(top_k=k))
        best = set(torch.topk(LOGITS, k).indices.tolist())
        assert set(tokens.unique().tolist()) <= best, f"top_k={k} sampled outside {best}"
        target = torch.zeros_like(PROBS)
        target[list(best)] = PROBS[list(best)] / PROBS[list(best)].sum()
        _assert_matches(_frequencies(tokens), target, f"top_k={k}")
    assert torch.equal(top_k_filter(LOGITS[None], 0), LOGITS[None]), "top_k=0 is off"


@pytest.mark.parametrize("p, kept", [(0.3, [1]), (0.5, [1, 3]), (0.7, [1, 3, 4]), (0.85, [1, 3, 4, 5]),
                                     (0.95, [1, 3, 4, 5, 0, 6]), (1.0, list(range(8)))])
def test_top_p_keeps_the_smallest_set_with_enough_mass(p, kept):
    """Sorted: 0.4, 0.25, 0.15, 0.08, 0.05, ...; cumulative 0.4, 0.65, 0.8, 0.88, 0.93, 0.96."""
    filtered = top_p_filter(LOGITS[None], p)[0]
    assert torch.isfinite(filtered).nonzero().flatten().sort().values.tolist() == sorted(kept), f"top_p={p}"
    tokens = _draw(SamplingParams(top_p=p))
    target = torch.zeros_like(PROBS)
    target[kept] = PROBS[kept] / PROBS[kept].sum()
    _assert_matches(_frequencies(tokens), target, f"top_p={p}")


def test_top_p_mass_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=g) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = torch.isfinite(top_p_filter(logits, p))
        probs = torch.softmax(logits, dim=-1)
        mass = (probs * kept).sum(-1)
        assert (mass >= p - 1e-6).all(), f"top_p={p}: kept mass {mass.min():.4f} < p"
        smallest_kept = torch.where(kept, probs, torch.inf).min(-1).values
        assert (mass - smallest_kept < p + 1e-6).all(), f"top_p={p}: the kept set is not the smallest one"


def test_min_p_keeps_tokens_above_a_fraction_of_the_top_probability():
    for min_p in (0.1, 0.3, 0.5, 1.0):
        kept = torch.isfinite(min_p_filter(LOGITS[None], min_p))[0]
        expected = PROBS >= min_p * PROBS.max() * (1 - 1e-6)
        assert torch.equal(kept, expected), f"min_p={min_p}: kept {kept.tolist()}"
        tokens = _draw(SamplingParams(min_p=min_p))
        target = torch.where(expected, PROBS, 0.0)
        _assert_matches(_frequencies(tokens), target / target.sum(), f"min_p={min_p}")


def test_min_p_applies_after_temperature():
    """At temperature 2 the distribution is flatter, so the same min_p keeps more tokens."""
    params = SamplingParams(temperature=2.0, min_p=0.3)
    kept = torch.isfinite(process_logits(LOGITS[None], params))[0]
    flat = torch.softmax(LOGITS / 2, -1)
    assert torch.equal(kept, flat >= 0.3 * flat.max())
    assert kept.sum() > torch.isfinite(min_p_filter(LOGITS[None], 0.3)).sum()


def test_seeds_reproduce_and_differ():
    probs = torch.softmax(torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)), -1)
    a = [sample(probs, make_generators(7, 4)) for _ in range(2)]
    assert torch.equal(a[0], a[1]), "the same seed must draw the same tokens"
    draws = torch.stack([sample(probs, make_generators(s, 4)) for s in range(20)])
    assert len({tuple(d.tolist()) for d in draws}) > 15, "different seeds should draw different tokens"
    per_row = sample(probs, make_generators([3, 4, 5, 6], 4))
    assert per_row[2] == sample(probs[2:3], make_generators([5], 1))[0], "a row's draw depends only on its seed"


def test_greedy_ignores_truncation_and_draws_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g)
    state = g.get_state()
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5)
    assert torch.equal(choose_tokens(logits, params, generators=[g]), logits.argmax(-1))
    assert torch.equal(g.get_state(), state), "greedy decoding must not consume random numbers"


def test_repetition_penalty_formula():
    """CTRL (Keskar et al. 2019): seen tokens' positive logits are divided by the penalty, negative ones
    multiplied (so both become less likely); unseen tokens are untouched."""
    logits = torch.tensor([[2.0, -1.0, 3.0, -0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, -0.5, 0.0]]
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # token 0 (logit 4) seen: 4 / 2 = 2 < 3, so greedy moves to token 1
    assert choose_tokens(torch.tensor([[4.0, 3.0]]), params, seen=torch.tensor([[True, False]])).tolist() == [1]


def test_frequency_and_presence_penalty_formula():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_frequency_presence_penalty(logits, counts, frequency=0.5, presence=0.25)
    expected = [[0.0, -(1 * 0.5 + 0.25), -(3 * 0.5 + 0.25), 0.0]]
    assert torch.allclose(out, torch.tensor(expected)), out.tolist()
    processed = process_logits(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), counts=counts)
    assert torch.allclose(processed, torch.tensor(expected))


def test_process_logits_order_and_no_op_defaults():
    """Defaults leave logits unchanged; filters apply after temperature (top-k on the tempered logits)."""
    assert torch.equal(process_logits(LOGITS[None], SamplingParams()), LOGITS[None])
    out = process_logits(LOGITS[None], SamplingParams(temperature=0.5, top_k=2))[0]
    assert torch.isfinite(out).sum() == 2
    assert math.isclose(out[1].item(), LOGITS[1].item() / 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), r"temperature=-1\.0"),
    (dict(top_p=0.0), r"top_p=0\.0 .*\(0, 1\]"),
    (dict(top_p=-0.1), r"top_p=-0\.1"),
    (dict(top_p=1.01), r"top_p=1\.01"),
    (dict(top_k=-3), "top_k=-3"),
    (dict(top_k=True), "top_k=True"),
    (dict(min_p=-0.1), r"min_p=-0\.1"),
    (dict(repetition_penalty=-1.0), "repetition_penalty=-1.0"),
    (dict(presence_penalty=float("nan")), "presence_penalty=nan"),
])
def test_invalid_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_seed_list_must_match_the_batch():
    with pytest.raises(ValueError, match="one int per row"):
        make_generators([1, 2], 3)


def test_token_and_top_logprobs_are_log_softmax():
    from lmforge.generate.sampling import token_logprobs, top_logprobs

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    reference = torch.log_softmax(logits.double(), dim=-1)
    chosen = torch.tensor([4, 0, 49])
    torch.testing.assert_close(token_logprobs(logits, chosen), reference[torch.arange(3), chosen].float())
    ids, lps = top_logprobs(logits, 5)
    assert ids.shape == lps.shape == (3, 5)
    assert torch.equal(ids[:, 0], logits.argmax(-1)), "the most likely token comes first"
    assert bool((lps[:, :-1] >= lps[:, 1:]).all()), "top log-probabilities must be sorted, most likely first"
    torch.testing.assert_close(lps, reference.gather(1, ids).float())
    below = reference.float().masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(1, ids, True), -1e9)
    assert bool((below.max(-1).values <= lps[:, -1]).all()), "a token outside the top k is more likely than one in it"
