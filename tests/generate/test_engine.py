"""The engine: the KV-cached path gives the reference path's greedy tokens for every family, batches of
different lengths give what each prompt gives alone, stop ids end rows, and bad inputs raise clear errors."""

from __future__ import annotations

import pytest
import torch

import lmforge

DECODERS = ["debug-gpt2", "debug-llama", "debug-mistral", "debug-mixtral", "debug-qwen2"]
ENCODER_DECODERS = ["debug-t5", "debug-transformer"]
NEW = 20
PROMPT = 12  # longer than debug-mistral's sliding window of 8


def _greedy(model, ids, **kw):
    """NEW tokens, greedy unless a temperature is given, never stopping early."""
    kw.setdefault("temperature", 0.0)
    if model.config.arch == "encoder_decoder" and model.config.pad_token_id is None:  # debug-transformer
        kw.setdefault("decoder_start_token_id", 0)
    return lmforge.generate(model, ids, max_new_tokens=NEW, eos_token_id=[], **kw)


def _left_pad(prompts: list[torch.Tensor], pad: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def _right_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = _left_pad([p.flip(0) for p in prompts], pad)
    return ids.flip(1), mask.flip(1)


def _assert_not_trivial(tokens: torch.Tensor, name: str) -> None:
    for row in tokens.tolist():
        assert len(set(row)) >= 4, f"{name}: greedy output {row} is too repetitive for the test to mean much"


@pytest.mark.parametrize("name", DECODERS + ENCODER_DECODERS)
@pytest.mark.parametrize("presence", [0.0, 100.0])
def test_cached_greedy_equals_recomputing_everything(name, presence, make_model, make_ids):
    """Plain greedy, and greedy with a presence penalty so large that no token repeats: then the cache
    holds 20 different tokens even for a model that would repeat one, and each argmax is still the model's
    choice among the unused tokens."""
    model = make_model(name)
    ids = make_ids(2, PROMPT)
    kw = dict(presence_penalty=presence)
    cached, plain = _greedy(model, ids, **kw), _greedy(model, ids, use_cache=False, **kw)
    assert cached.shape == (2, NEW)
    if presence or name != "debug-transformer":  # see conftest: that preset collapses at random weights
        _assert_not_trivial(plain, name)
    assert torch.equal(cached, plain), f"{name}: KV-cached greedy tokens differ from the no-cache reference\n" \
        f"cache:    {cached.tolist()}\nno cache: {plain.tolist()}"
    assert model.training, "generate must restore the model's train/eval mode"


@pytest.mark.parametrize("name", DECODERS + ENCODER_DECODERS)
def test_cached_sampling_equals_recomputing_everything(name, make_model, make_ids):
    model = make_model(name)
    ids = make_ids(2, PROMPT, seed=5)
    kw = dict(temperature=1.0, top_k=40, seed=3)
    cached, plain = _greedy(model, ids, **kw), _greedy(model, ids, use_cache=False, **kw)
    _assert_not_trivial(plain, name)
    assert torch.equal(cached, plain), f"{name}: seeded sampling differs with and without the cache\n" \
        f"cache:    {cached.tolist()}\nno cache: {plain.tolist()}"


@pytest.mark.parametrize("name", DECODERS)
def test_left_padded_batch_equals_one_by_one(name, make_model, make_ids):
    model = make_model(name)
    lengths = [PROMPT, 3, 9, 1]
    prompts = [make_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = _left_pad(prompts)
    for use_cache in (True, False):
        batched = _greedy(model, ids, attention_mask=mask, use_cache=use_cache)
        for row, prompt in enumerate(prompts):
            alone = _greedy(model, prompt[None], use_cache=use_cache)[0]
            assert torch.equal(batched[row], alone), \
                f"{name} (use_cache={use_cache}): row {row} (prompt of {len(prompt)} tokens, left padded to " \
                f"{ids.shape[1]}) gives {batched[row].tolist()} in the batch but {alone.tolist()} alone"


def test_penalties_look_at_real_prompt_tokens_only(make_model, make_ids):
    """Pads are stored as id 0 inside the engine; a repetition penalty must still see a real token 0."""
    model = make_model("debug-llama")
    prompt = torch.cat([torch.tensor([0, 0]), make_ids(1, 4)[0]])
    ids, mask = _left_pad([prompt, prompt[:1]])
    kw = dict(repetition_penalty=3.0, frequency_penalty=0.5, presence_penalty=0.5)
    batched = _greedy(model, ids, attention_mask=mask, **kw)
    for row, p in enumerate([prompt, prompt[:1]]):
        assert torch.equal(batched[row], _greedy(model, p[None], **kw)[0]), f"row {row} differs with penalties"


@pytest.mark.parametrize("name", ENCODER_DECODERS)
def test_right_padded_sources_equal_one_by_one(name, make_model, make_ids):
    model = make_model(name)
    prompts = [make_ids(1, n, seed=20 + i)[0] for i, n in enumerate([PROMPT, 4, 7])]
    ids, mask = _right_pad(prompts)
    for use_cache in (True, False):
        batched = _greedy(model, ids, attention_mask=mask, use_cache=use_cache)
        for row, prompt in enumerate(prompts):
            alone = _greedy(model, prompt[None], use_cache=use_cache)[0]
            assert torch.equal(batched[row], alone), \
                f"{name} (use_cache={use_cache}): row {row} gives {batched[row].tolist()} batched, " \
                f"{alone.tolist()} alone"


@pytest.mark.parametrize("name", ["debug-llama", "debug-t5"])
def test_logprobs_are_the_models_log_softmax_of_the_chosen_tokens(name, make_model, make_ids):
    model = make_model(name).eval()
    ids = make_ids(2, 6)
    new, logprobs = _greedy(model, ids, return_logprobs=True)
    with torch.no_grad():
        if model.config.arch == "decoder":
            logits = model(torch.cat([ids, new], dim=1)).logits[:, ids.shape[1] - 1:-1]
        else:
            start = torch.full((2, 1), model.config.pad_token_id)
            logits = model(ids, torch.cat([start, new[:, :-1]], dim=1)).logits
    expected = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])[..., 0]
    assert torch.allclose(logprobs, expected, atol=1e-4), f"{name}: {logprobs} vs {expected}"
    best = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(logprobs, best, atol=1e-4), "greedy tokens must be the most likely ones"


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_ids_end_rows_and_the_loop(make_model, make_ids, use_cache):
    model = make_model("debug-llama")
    ids = make_ids(3, 5, seed=3)
    free = _greedy(model, ids, use_cache=use_cache)
    eos = int(free[0, 4])
    first = [row.index(eos) if eos in row else None for row in free.tolist()]
    out, logprobs = lmforge.generate(model, ids, max_new_tokens=NEW, temperature=0.0, eos_token_id=eos,
                                     pad_token_id=7, use_cache=use_cache, return_logprobs=True)
    n = NEW if None in first else max(first) + 1
    assert out.shape == (3, n), f"rows stop at {first}: expected {n} new tokens, got {out.shape[1]}"
    for row, stop in enumerate(first):
        if stop is None:
            assert torch.equal(out[row], free[row, :n])
        else:
            assert out[row, :stop + 1].tolist() == free[row, :stop + 1].tolist(), "tokens up to eos must not change"
            assert (out[row, stop + 1:] == 7).all(), f"a finished row must emit pad_token_id: {out[row].tolist()}"
            assert (logprobs[row, stop + 1:] == 0).all(), "pads of a finished row have log-probability 0"
    # every row stops after its first token: the loop ends after one step
    everyone = lmforge.generate(model, ids, max_new_tokens=NEW, temperature=0.0, eos_token_id=[],
                                stop_token_ids=free[:, 0].tolist(), use_cache=use_cache)
    assert torch.equal(everyone, free[:, :1])


def test_eos_defaults_to_the_config_and_fills_with_it(make_model, make_ids):
    model = make_model("debug-llama")
    ids = make_ids(2, 5, seed=3)
    free = _greedy(model, ids)
    model.config.eos_token_id = int(free[0, 2])
    out = lmforge.generate(model, ids, max_new_tokens=NEW, temperature=0.0)
    assert out[0, :3].tolist() == free[0, :3].tolist()
    assert (out[0, 3:] == model.config.eos_token_id).all(), "no pad id in the config: finished rows repeat eos"


def test_seeded_sampling_through_the_engine(make_model, make_ids):
    model = make_model("debug-qwen2")
    ids = make_ids(2, 5)
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=50, eos_token_id=[])
    a = lmforge.generate(model, ids, seed=1, **kw)
    assert torch.equal(a, lmforge.generate(model, ids, seed=1, **kw)), "same seed, different tokens"
    assert torch.equal(a, lmforge.generate(model, ids, seed=1, use_cache=False, **kw))
    assert not torch.equal(a, lmforge.generate(model, ids, seed=2, **kw)), "different seeds, same 40 tokens"
    # one seed per row: a row samples the same tokens in a batch as alone
    per_row = lmforge.generate(model, ids, seed=[5, 6], **kw)
    assert torch.equal(per_row[1], lmforge.generate(model, ids[1:], seed=[6], **kw)[0])


def test_penalties_change_greedy_output(make_model, make_ids):
    model = make_model("debug-llama")
    ids = make_ids(1, 4)
    plain = _greedy(model, ids)
    penalised = _greedy(model, ids, repetition_penalty=5.0)
    assert not torch.equal(plain, penalised)
    assert torch.equal(penalised, _greedy(model, ids, repetition_penalty=5.0, use_cache=False))
    no_repeats = _greedy(model, ids, presence_penalty=1e4)
    assert len(set(no_repeats[0].tolist())) == NEW, "a huge presence penalty forbids any repeat"


def test_max_new_tokens_zero_and_one(make_model, make_ids):
    model = make_model("debug-gpt2")
    ids = make_ids(2, 3)
    assert lmforge.generate(model, ids, max_new_tokens=0).shape == (2, 0)
    assert torch.equal(lmforge.generate(model, ids, max_new_tokens=1, temperature=0.0, eos_token_id=[]),
                       _greedy(model, ids)[:, :1])


def test_cache_is_sized_exactly(make_model, make_ids):
    """A prompt that fills the learned position table exactly, with one new token, still works."""
    model = make_model("debug-gpt2")
    limit = model.config.position.max_seq_len
    out = lmforge.generate(model, make_ids(1, limit - 4), max_new_tokens=5, temperature=0.0, eos_token_id=[])
    assert out.shape == (1, 5)


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.5), r"temperature=-0\.5.*>= 0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0.0), r"top_p=0\.0.*\(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1\.5.*\(0, 1\]"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(min_p=1.2), r"min_p=1\.2.*\[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty=inf"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(seed=[1, 2, 3]), r"seed=\[1, 2, 3\].*2 rows"),
])
def test_invalid_settings_name_the_value(make_model, make_ids, kw, match):
    model = make_model("debug-llama")
    with pytest.raises(ValueError, match=match):
        lmforge.generate(model, make_ids(2, 3), **{"max_new_tokens": 4, **kw})


def test_prompt_errors(make_model, make_ids):
    model = make_model("debug-gpt2")  # learned positions: a context of 128
    with pytest.raises(ValueError, match="prompt is empty"):
        lmforge.generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are empty"):
        lmforge.generate(model, make_ids(2, 3), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"130 tokens but the model's context holds 128 positions"):
        lmforge.generate(model, make_ids(1, 130), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"100 tokens plus max_new_tokens=40 needs 139 .* lower max_new_tokens to 29"):
        lmforge.generate(model, make_ids(1, 100), max_new_tokens=40)
    with pytest.raises(ValueError, match=r"row 0 has padding on the right.*left padding"):
        lmforge.generate(model, make_ids(1, 3), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"vocabulary is \[0, 256\)"):
        lmforge.generate(model, torch.tensor([[1, 300]]), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"ids\[None\]"):
        lmforge.generate(model, torch.tensor([1, 2]), max_new_tokens=4)
    with pytest.raises(TypeError, match="integer tensor"):
        lmforge.generate(model, torch.tensor([[1.0, 2.0]]), max_new_tokens=4)


@pytest.mark.parametrize("name", ["debug-llama", "debug-gpt2"])  # RoPE and a learned table: the same limit
def test_context_is_enforced_for_every_position_kind(name, make_model, make_ids):
    model = make_model(name, position={"max_seq_len": 32})
    with pytest.raises(ValueError, match=r"the prompt has 40 tokens but the model's context holds 32 positions"
                                         r".*truncate_prompt=True"):
        lmforge.generate(model, make_ids(1, 40), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"30 tokens plus max_new_tokens=8 needs 37 .* lower max_new_tokens to 3 "
                                         r"or .*truncate_prompt=True"):
        lmforge.generate(model, make_ids(1, 30), max_new_tokens=8)
    assert lmforge.generate(model, make_ids(1, 30), max_new_tokens=3, eos_token_id=[]).shape == (1, 3)


def test_truncate_prompt_keeps_the_last_tokens(make_model, make_ids):
    """A decoder keeps each row's last limit - max_new_tokens + 1 tokens, padded rows included."""
    model = make_model("debug-llama", position={"max_seq_len": 32})
    long, short = make_ids(1, 45, seed=3)[0], make_ids(1, 10, seed=4)[0]
    ids, mask = _left_pad([long, short])
    kw = dict(max_new_tokens=8, temperature=0.0, eos_token_id=[])
    cut = lmforge.generate(model, ids, attention_mask=mask, truncate_prompt=True, **kw)
    assert torch.equal(cut[0], lmforge.generate(model, long[-25:][None], **kw)[0]), "row 0 must keep its last 25 tokens"
    assert torch.equal(cut[1], lmforge.generate(model, short[None], **kw)[0]), "a row that fits must not change"
    with pytest.raises(ValueError, match="lower max_new_tokens to 32"):  # no prompt leaves room for 40 new tokens
        lmforge.generate(model, ids, attention_mask=mask, truncate_prompt=True, max_new_tokens=40)


def test_truncate_source_keeps_the_first_tokens(make_model, make_ids):
    model = make_model("debug-t5", position={"max_seq_len": 16})
    src = make_ids(1, 20)
    with pytest.raises(ValueError, match=r"the source has 20 tokens .* holds 16 .*keep its first tokens"):
        lmforge.generate(model, src, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"max_new_tokens=17 needs 17 .* lower max_new_tokens to 16"):
        lmforge.generate(model, src[:, :5], max_new_tokens=17)
    kw = dict(max_new_tokens=6, temperature=0.0, eos_token_id=[])
    assert torch.equal(lmforge.generate(model, src, truncate_prompt=True, **kw),
                       lmforge.generate(model, src[:, :16], **kw))


def test_encoder_decoder_errors(make_model, make_ids):
    model = make_model("debug-t5")
    with pytest.raises(ValueError, match=r"row 0 has padding on the left.*right padding"):
        lmforge.generate(model, make_ids(1, 3), attention_mask=torch.tensor([[0, 1, 1]]), max_new_tokens=4)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        lmforge.generate(model, make_ids(1, 3), max_new_tokens=4)
    out = lmforge.generate(model, make_ids(1, 3), max_new_tokens=4, decoder_start_token_id=0, temperature=0.0)
    assert out.shape[0] == 1


def test_decoder_start_token_id_in_the_config(make_model, make_ids):
    """The config's start id is used (BART starts from eos), and validated."""
    model = make_model("debug-t5")
    ids = make_ids(1, 5)
    kw = dict(max_new_tokens=6, temperature=0.0, eos_token_id=[])
    from_pad = lmforge.generate(model, ids, **kw)
    model.config.decoder_start_token_id = 7
    from_config = lmforge.generate(model, ids, **kw)
    assert torch.equal(from_config, lmforge.generate(model, ids, decoder_start_token_id=7, **kw))
    assert not torch.equal(from_config, from_pad), "starting from 7 or from <pad> should not give the same tokens"
    with pytest.raises(ValueError, match=r"decoder_start_token_id=300 must be a token id in \[0, vocab_size=256\)"):
        lmforge.ModelConfig.from_preset("debug-t5", decoder_start_token_id=300)
    with pytest.raises(ValueError, match="decoder_start_token_id=0 applies to encoder-decoders only"):
        lmforge.ModelConfig.from_preset("debug-llama", decoder_start_token_id=0)


def test_encoder_only_models_are_refused():
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-bert"), seed=0)
    with pytest.raises(ValueError, match="arch='encoder'"):
        lmforge.generate(model, torch.tensor([[1, 2]]), max_new_tokens=2)


@pytest.mark.parametrize("name", ["debug-llama", "debug-t5"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_session_reorder_continues_the_chosen_rows(make_model, make_ids, name, use_cache):
    """After reorder([1, 1, 0]) the session continues rows 1, 1, 0: same logits as those rows had."""
    from lmforge.generate.session import DecoderSession, EncoderDecoderSession

    model = make_model(name).eval()
    ids = make_ids(2, 6)
    mask = torch.ones_like(ids)
    if name == "debug-llama":
        mask[0, :2] = 0
        session = DecoderSession(model, ids, mask, max_new_tokens=4, use_cache=use_cache)
    else:
        mask[1, 4:] = 0
        session = EncoderDecoderSession(model, ids, mask, max_new_tokens=4, use_cache=use_cache, start_id=0)
    with torch.no_grad():
        session.prefill()
        before = session.step(torch.tensor([5, 9]))
        session.reorder(torch.tensor([1, 1, 0]))
        after = session.step(torch.tensor([7, 7, 7]))
    reference = DecoderSession if name == "debug-llama" else EncoderDecoderSession
    kwargs = {} if name == "debug-llama" else {"start_id": 0}
    for row, old in enumerate([1, 1, 0]):
        alone = reference(model, ids[old:old + 1], mask[old:old + 1], max_new_tokens=4, use_cache=use_cache, **kwargs)
        with torch.no_grad():
            alone.prefill()
            torch.testing.assert_close(alone.step(torch.tensor([[5, 9][old]])), before[old:old + 1], atol=1e-4, rtol=0)
            torch.testing.assert_close(alone.step(torch.tensor([7])), after[row:row + 1], atol=1e-4, rtol=0)


def test_generate_dispatches_to_beam_search_and_speculative_decoding(make_model, make_ids):
    from lmforge.generate.beam import beam_search
    from lmforge.generate.speculative import speculative_generate

    model, ids = make_model("debug-llama").eval(), make_ids(2, 5)
    beams = lmforge.generate(model, ids, max_new_tokens=6, num_beams=3, num_return_sequences=2, eos_token_id=[])
    assert torch.equal(beams, beam_search(model, ids, num_beams=3, num_return_sequences=2, max_new_tokens=6,
                                          eos_token_id=[]).sequences)
    draft = make_model("debug-llama", seed=1).eval()
    spec = lmforge.generate(model, ids[:1], max_new_tokens=8, temperature=0.0, draft_model=draft, num_draft_tokens=3)
    assert torch.equal(spec, lmforge.generate(model, ids[:1], max_new_tokens=8, temperature=0.0))
    assert torch.equal(spec, speculative_generate(model, ids[:1], max_new_tokens=8, temperature=0.0,
                                                  draft_model=draft, num_draft_tokens=3)[0])
    with pytest.raises(ValueError, match="top_p=0.5 has no meaning for beam search"):
        lmforge.generate(model, ids, max_new_tokens=2, num_beams=2, top_p=0.5)
    with pytest.raises(ValueError, match="do not combine"):
        lmforge.generate(model, ids[:1], max_new_tokens=2, num_beams=2, prompt_lookup=2)
    with pytest.raises(ValueError, match="does not support"):
        lmforge.generate(model, ids[:1], max_new_tokens=2, prompt_lookup=2, return_logprobs=True)


@pytest.mark.parametrize("cache", ["static", "dynamic", "sliding", "auto"])
def test_generate_cache_kinds_give_the_reference_tokens(make_model, make_ids, cache):
    model = make_model("debug-mistral", **{"attention.sliding_window": 4})
    ids, mask = make_ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    reference = lmforge.generate(model, ids, attention_mask=mask, max_new_tokens=12, temperature=0.0, use_cache=False)
    got = lmforge.generate(model, ids, attention_mask=mask, max_new_tokens=12, temperature=0.0, cache=cache)
    assert torch.equal(got, reference)


def test_generate_refuses_an_unknown_cache_kind(make_model, make_ids):
    from lmforge.generate import stream

    with pytest.raises(ValueError, match="cache='paged' is not a KV cache kind"):
        stream(make_model("debug-llama"), make_ids(1, 3), max_new_tokens=2, cache="paged")
