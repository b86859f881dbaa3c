"""Speculative decoding: greedy output equals plain greedy decoding token for token (draft models of several
kinds, prompt lookup, k in {1, 3, 5}, stops), and speculative sampling follows the target's distribution
(a statistical test, shown to fail for a wrong acceptance rule)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lmforge
from lmforge.generate import speculative
from lmforge.generate.sampling import SamplingParams, process_logits, sample
from lmforge.generate.speculative import lookup_draft, speculative_generate

NEW = 30
PROMPT = 12  # longer than debug-mistral's sliding window of 8, so verification chunks cross it


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models make tiny matmuls: a second thread only adds hand-off cost (and spin-waits when other
    processes share the 2 cores), which the thousands of calls below would multiply."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _noisy_copy(model: torch.nn.Module, std: float = 0.01, seed: int = 9) -> torch.nn.Module:
    """A draft that mostly agrees with the target: its weights plus N(0, std) noise (std 0.01 on weights of
    std 0.2 accepts 25-70% of greedy drafts, so both the accept and the reject path run)."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return draft


def _plain(model, ids, **kw):
    return lmforge.generate(model, ids, max_new_tokens=kw.pop("max_new_tokens", NEW), temperature=0.0, **kw)


def _spec(model, ids, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("temperature", 0.0)
    return speculative_generate(model, ids, **kw)


def _check_stats(stats, out, name: str) -> None:
    """Every target call emits the drafts it accepted plus one token of its own (no stop id here)."""
    assert stats.new_tokens == out.shape[1]
    assert 0 <= stats.accepted <= stats.drafted, f"{name}: {stats}"
    assert stats.new_tokens == stats.accepted + stats.target_calls, f"{name}: {stats}"
    assert stats.tokens_per_target_call == pytest.approx(stats.new_tokens / stats.target_calls)


# -- greedy: exactly the target's tokens --------------------------------------------------------------------


PAIRS = {  # target preset -> how its draft is made
    "debug-llama": "noisy copy",
    "debug-gpt2": "noisy copy",
    "debug-mistral": "noisy copy",  # sliding window: chunks of k + 1 verified tokens cross the window
    "debug-mixtral": "noisy copy",  # MoE routing on a chunk of k + 1 tokens
}


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("name", list(PAIRS))
def test_greedy_with_draft_model_equals_plain_greedy(name, k, make_model, make_ids):
    model = make_model(name)
    draft = _noisy_copy(model)
    ids = make_ids(1, PROMPT)
    plain = _plain(model, ids, eos_token_id=[])
    out, stats = _spec(model, ids, draft_model=draft, num_draft_tokens=k, eos_token_id=[])
    assert torch.equal(out, plain), f"{name}, k={k}: speculative greedy differs from plain greedy\n" \
        f"speculative: {out.tolist()}\nplain:       {plain.tolist()}\n{stats}"
    _check_stats(stats, out, name)
    assert 0 < stats.accepted < stats.drafted, f"{name}, k={k}: the test should see accepts and rejects: {stats}"
    assert stats.draft_calls == stats.drafted  # one draft call per drafted token, none wasted
    assert model.training and draft.training, "train/eval modes must be restored"


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_unrelated_draft_of_another_family(k, make_model, make_ids):
    """A GPT-2 target with a one-layer Llama draft (same 256 ids): nearly every draft is rejected, and the
    output is still the target's."""
    model, draft = make_model("debug-gpt2"), make_model("debug-llama", seed=3, n_layer=1)
    ids = make_ids(1, PROMPT, seed=4)
    out, stats = _spec(model, ids, draft_model=draft, num_draft_tokens=k, eos_token_id=[])
    assert torch.equal(out, _plain(model, ids, eos_token_id=[]))
    _check_stats(stats, out, "gpt2 <- llama")


def test_draft_equal_to_target_accepts_everything(make_model, make_ids):
    model = make_model("debug-llama")
    ids = make_ids(1, PROMPT)
    out, stats = _spec(model, ids, draft_model=model, num_draft_tokens=4, eos_token_id=[])
    assert torch.equal(out, _plain(model, ids, eos_token_id=[]))
    assert stats.acceptance_rate == 1.0, stats
    assert stats.target_calls == NEW // 5 and stats.tokens_per_target_call == 5.0, stats  # k + 1 per call


def test_draft_vocabularies_padded_differently(make_model, make_ids):
    """A draft with fewer ids (the target's weights, vocab 240 padded to 256 rows) never proposes ids
    240..255, so the target's choices among them come from the residual; a draft with more ids (260) has its
    extra logits dropped."""
    model = make_model("debug-llama")
    ids = make_ids(1, PROMPT)
    plain = _plain(model, ids, eos_token_id=[])
    narrow = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-llama", vocab_size=240,
                                                                  pad_vocab_multiple=128))
    narrow.load_state_dict(model.state_dict())
    assert int(plain.max()) >= 240, f"the target should emit an id the narrow draft lacks: {plain.tolist()}"
    wide = make_model("debug-llama", seed=3, n_layer=1, vocab_size=260)
    for draft in (narrow, wide):
        out, stats = _spec(model, ids, draft_model=draft, num_draft_tokens=3, eos_token_id=[])
        assert torch.equal(out, plain), f"draft vocab {draft.config.vocab_size}: {out.tolist()} != {plain.tolist()}"
        _check_stats(stats, out, f"draft vocab {draft.config.vocab_size}")


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("ngram", [1, 3])
@pytest.mark.parametrize("std", [0.2, 0.1])
def test_greedy_with_prompt_lookup_equals_plain_greedy(std, ngram, k, make_model, make_ids):
    """At std 0.1 the model's greedy output settles into repeating itself, which lookup predicts (accepts);
    the prompt repeats its first 6 tokens, so lookup proposes from the start."""
    model = make_model("debug-llama", std=std)
    head = make_ids(1, 6, seed=7)
    ids = torch.cat([head, make_ids(1, 4, seed=8), head], dim=1)
    out, stats = _spec(model, ids, prompt_lookup=ngram, num_draft_tokens=k, eos_token_id=[])
    assert torch.equal(out, _plain(model, ids, eos_token_id=[])), stats
    _check_stats(stats, out, f"lookup {ngram}")
    assert stats.drafted > 0 and stats.draft_calls == 0, stats
    if std == 0.1:
        assert stats.accepted > 0 and stats.tokens_per_target_call > 1.5, stats


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_stops_at_eos_like_plain_greedy(proposer, make_model, make_ids):
    model = make_model("debug-llama", std=0.1)
    ids = make_ids(1, PROMPT)
    plain = _plain(model, ids, eos_token_id=[])[0].tolist()
    at = next(i for i in range(4, NEW) if plain[i] not in plain[:i])  # an id whose first use is late
    eos = plain[at]
    kw = dict(draft_model=_noisy_copy(model)) if proposer == "draft" else dict(prompt_lookup=2)
    out, stats = _spec(model, ids, num_draft_tokens=4, eos_token_id=eos, **kw)
    assert out[0].tolist() == plain[:at + 1], f"should end at the first {eos} (position {at}): {out.tolist()}"
    assert torch.equal(out, _plain(model, ids, eos_token_id=eos))
    assert stats.new_tokens == at + 1


def test_max_new_tokens_left_padding_and_seeded_sampling(make_model, make_ids):
    model = make_model("debug-llama")
    draft = _noisy_copy(model)
    ids = make_ids(1, PROMPT)
    for n in (0, 1, 2, 7):
        out, stats = _spec(model, ids, draft_model=draft, max_new_tokens=n, num_draft_tokens=5, eos_token_id=[])
        assert out.shape == (1, n) and torch.equal(out, _plain(model, ids, max_new_tokens=n, eos_token_id=[]))
    padded = torch.cat([torch.full((1, 3), -100), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    out, _ = _spec(model, padded, attention_mask=mask, draft_model=draft, eos_token_id=[])
    assert torch.equal(out, _plain(model, ids, eos_token_id=[]))
    kw = dict(draft_model=draft, temperature=1.0, top_p=0.9, eos_token_id=[])
    a, b, c = (_spec(model, ids, seed=s, **kw)[0] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c), "the seed must fix (and only fix) the sample"


def test_lookup_draft():
    seq = [5, 1, 2, 3, 9, 1, 2, 4, 1, 2]
    assert lookup_draft(seq, 2, 3) == [3, 9, 1]  # earliest match of (1, 2), as in Saxena's reference code
    assert lookup_draft(seq, 3, 3) == [3, 9, 1]  # (4, 1, 2) never occurred: backs off to 2
    assert lookup_draft([7, 8, 9, 8], 2, 5) == [9, 8]  # (9, 8) unseen; 1-gram (8): continuation up to the end
    assert lookup_draft([1, 2, 3], 3, 4) == []
    assert lookup_draft([4, 4], 1, 0) == []


def test_errors(make_model, make_ids):
    model, draft = make_model("debug-llama"), make_model("debug-llama", n_layer=1)
    ids = make_ids(1, 5)
    cases = [
        (dict(input_ids=make_ids(2, 5), draft_model=draft), "one prompt at a time"),
        (dict(), "exactly one of draft_model"),
        (dict(draft_model=draft, prompt_lookup=3), "exactly one of draft_model"),
        (dict(draft_model=draft, num_draft_tokens=0), "num_draft_tokens=0"),
        (dict(prompt_lookup=0), "prompt_lookup=0"),
        (dict(draft_model=draft, repetition_penalty=1.2), "penalties"),
        (dict(draft_model=draft, top_p=0.0), "top_p=0.0"),
        (dict(draft_model=make_model("debug-llama", vocab_size=512)), "share the tokenizer"),
        (dict(draft_model=make_model("debug-llama", vocab_size=250)), "draft embeds 250 ids"),
        (dict(draft_model=make_model("debug-t5")), "draft model must be decoder-only"),
        (dict(draft_model=make_model("debug-gpt2")), "draft model's context holds 128"),
    ]
    for kw, match in cases:
        kw = {"input_ids": ids, "max_new_tokens": 4, **kw}
        if "context holds" in match:
            kw["max_new_tokens"] = 200
        with pytest.raises(ValueError, match=match):
            speculative_generate(model, **kw)
    with pytest.raises(ValueError, match="decoder-only models"):
        speculative_generate(make_model("debug-t5"), ids, max_new_tokens=4, prompt_lookup=2)


# -- sampling: the target's distribution, exactly -----------------------------------------------------------

V = 8  # a small vocabulary: the joint of two tokens has 64 cells, enumerable and well covered by samples
PROMPT8 = [1, 2, 0, 1, 2]  # repeats (1, 2): lookup proposes (0, 1) first; the target gives 0 p = 0.45
DELTA = 1e-6  # the probability that a correct implementation fails the test (a proven bound, below)


def _exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """P[a, b] = p(a | prompt) p(b | prompt, a): the target's distribution of its first two tokens (V, V),
    after the same logits processing, by enumerating every first token."""
    with torch.no_grad():
        first = process_logits(model(torch.tensor([PROMPT8])).logits[:, -1], params)  # (1, V)
        second = process_logits(model(torch.tensor([PROMPT8 + [a] for a in range(V)])).logits[:, -1], params)
    return torch.softmax(first, -1)[0][:, None] * torch.softmax(second, -1)  # (V, V)


def _empirical_joint(model, n: int, **kw) -> torch.Tensor:
    counts = torch.zeros(V, V)
    for seed in range(n):  # one generator per sample: independent draws
        out, _ = speculative_generate(model, torch.tensor([PROMPT8]), seed=seed, eos_token_id=[], **kw)
        counts[out[0, 0], out[0, 1]] += 1
    return counts / n


def _tv_threshold(P: torch.Tensor, n: int) -> float:
    """A bound on the total-variation distance between the empirical distribution of n i.i.d. draws from P
    and P, exceeded with probability <= DELTA. E|freq_i - P_i| <= sqrt(P_i (1 - P_i) / n) (Jensen), so
    E[TV] <= 1/2 sum_i sqrt(P_i (1 - P_i) / n); one draw moves TV by at most 1/n, so McDiarmid's inequality
    gives P(TV > E[TV] + t) <= exp(-2 n t^2) = DELTA for t = sqrt(ln(1 / DELTA) / (2 n))."""
    expected = 0.5 * (P * (1 - P) / n).sqrt().sum().item()
    return expected + math.sqrt(math.log(1 / DELTA) / (2 * n))


@pytest.fixture
def small_pair(make_model):
    """A one-layer target and a deliberately different draft (other weights; TV ~0.8 between their joints)."""
    target = make_model("debug-llama", seed=0, vocab_size=V, n_layer=1).eval()
    draft = make_model("debug-llama", seed=5, vocab_size=V, n_layer=1).eval()
    return target, draft


CASES = {  # proposer, k and processing: k = 2 with 3 new tokens lets the second token be a second draft
    "draft": (dict(num_draft_tokens=2, max_new_tokens=3), dict(temperature=1.0, top_k=6)),
    "lookup": (dict(prompt_lookup=2, num_draft_tokens=2, max_new_tokens=3), dict(temperature=0.8, top_p=0.95)),
}
N_SAMPLES = 1500


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_preserves_the_target_distribution(case, small_pair):
    """Modified rejection sampling (Leviathan et al. 2023, Theorem / Appendix A.1): whatever the draft, the
    tokens follow the target's distribution. 1500 samples; with the draft the joint of the first two tokens
    comes from accepting, rejecting at the first or the second draft (residual), and from bonus tokens."""
    target, draft = small_pair
    proposer, processing = CASES[case]
    if case == "draft":
        proposer = dict(proposer, draft_model=draft)
    P = _exact_joint(target, SamplingParams(**processing))
    emp = _empirical_joint(target, N_SAMPLES, **proposer, **processing)
    tv, bound = 0.5 * (emp - P).abs().sum().item(), _tv_threshold(P, N_SAMPLES)
    assert tv <= bound, f"{case}: empirical joint of the first two tokens is {tv:.3f} from the target's " \
        f"(total variation), beyond the {bound:.3f} a correct sampler exceeds with probability {DELTA}"


def _always_accept(p, q, drafted, generators):
    """Wrong: keeps every draft, so the output follows the draft."""
    m = drafted.shape[0]
    return m, int(sample(p[m:], generators)[0])


def _resample_from_p(p, q, drafted, generators):
    """Wrong, subtly: the acceptance test is right but a rejection resamples from p, not norm(max(0, p - q)),
    which over-weights the drafted tokens."""
    m = drafted.shape[0]
    u = torch.rand(m, generator=generators[0])
    rows = torch.arange(m)
    rejected = (u * q[rows, drafted] >= p[rows, drafted]).nonzero()
    i = int(rejected[0, 0]) if rejected.numel() else m
    return i, int(sample(p[i:i + 1], generators)[0])


@pytest.mark.parametrize(("rule", "case", "n"), [(_always_accept, "draft", 300), (_resample_from_p, "lookup", 800)])
def test_statistical_test_catches_a_wrong_acceptance_rule(rule, case, n, small_pair, monkeypatch):
    """The test above with `verify` replaced by a wrong rule must fail, so it has power. (Measured: always
    accepting gives TV 0.87 against a bound of 0.27 at 300 samples; resampling from p gives 0.25 against
    0.10 at 1500 samples with lookup, 0.18 against 0.12 with the draft model.)"""
    target, draft = small_pair
    monkeypatch.setattr(speculative, "verify", rule)
    proposer, processing = CASES[case]
    if case == "draft":
        proposer = dict(proposer, draft_model=draft)
    P = _exact_joint(target, SamplingParams(**processing))
    emp = _empirical_joint(target, n, **proposer, **processing)
    tv, bound = 0.5 * (emp - P).abs().sum().item(), _tv_threshold(P, n)
    assert tv > bound, f"{rule.__name__} gives TV {tv:.3f} <= {bound:.3f}: the statistical test lacks power"
