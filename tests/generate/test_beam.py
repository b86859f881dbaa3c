"""Beam search equals transformers' `generate(num_beams=...)` on the same weights (ours written with
`lmforge.save_hf`, read back by transformers in fp32 with eager attention): same sequences, and scores equal to
`sequences_scores`, for every length_penalty x early_stopping pair. The eos id is the token greedy decoding emits
most, so hypotheses really finish early and the finished pool, the stop rules and the length penalty all act."""

from __future__ import annotations

import itertools

import pytest
import torch

import lmforge
from lmforge.generate.beam import beam_search
from lmforge.generate.session import positions_from_mask

transformers = pytest.importorskip("transformers")

NEW = 12
PAD = 5  # not 0: transformers fills with the eos id when the pad id is 0
BART = dict(position={"kind": "learned", "offset": 2, "max_seq_len": 64}, embed_norm=True, embed_scale=1.0,
            norm={"eps": 1e-5}, hf_model_type="bart", pad_token_id=1, bos_token_id=0, eos_token_id=2)
# case -> (preset, overrides, num_beams, num_return_sequences)
CASES = {
    "gpt2": ("debug-gpt2", {}, 4, 3),
    "llama": ("debug-llama", {}, 3, 2),
    "t5": ("debug-t5", {}, 4, 4),
    "bart": ("debug-transformer", BART, 3, 1),  # the 2017 Transformer reshaped into BART's layout
}
SETTINGS = list(itertools.product([1.0, 0.0, 2.0], [False, True, "never"]))  # length_penalty x early_stopping


def _batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows; the second padded on the side its family needs (left: decoders, right: sources)."""
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if model.config.arch == "decoder":
        mask[1, :3] = 0
    else:
        mask[1, 4:] = 0
    return ids, mask


def _start(model) -> dict:
    """BART starts decoding from </s>, T5 from <pad> (its config's decoder_start_token_id)."""
    return {"decoder_start_token_id": 2} if model.config.hf_model_type == "bart" else {}


def _frequent_token(model, ids, mask) -> int:
    new = lmforge.generate(model, ids, attention_mask=mask, max_new_tokens=20, temperature=0.0, eos_token_id=[],
                           **_start(model))
    values, counts = new.flatten().unique(return_counts=True)
    return int(values[counts.argmax()])


@pytest.fixture
def pairs(make_model, tmp_path):
    """case -> (ours, transformers' copy of it)."""

    def get(case: str, hf: bool = True):
        preset, overrides = CASES[case][:2]
        ours = make_model(preset, **overrides).eval()
        if not hf:
            return ours, None
        lmforge.save_hf(ours, tmp_path / case)
        auto = transformers.AutoModelForSeq2SeqLM if ours.config.arch == "encoder_decoder" else \
            transformers.AutoModelForCausalLM
        theirs = auto.from_pretrained(tmp_path / case, attn_implementation="eager", dtype=torch.float32).eval()
        theirs.generation_config.forced_eos_token_id = None  # BART's config forces eos at the last step
        return ours, theirs

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_beam_search_equals_hf(case, pairs):
    ours, theirs = pairs(case)
    _, _, beams, returned = CASES[case]
    ids, mask = _batch(ours)
    eos = _frequent_token(ours, ids, mask)
    encdec = ours.config.arch == "encoder_decoder"
    lengths = set()
    for penalty, early in SETTINGS:
        kw = dict(num_beams=beams, max_new_tokens=NEW, length_penalty=penalty, early_stopping=early,
                  num_return_sequences=returned, eos_token_id=eos, pad_token_id=PAD, **_start(ours))
        hf = theirs.generate(ids, attention_mask=mask, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **kw)
        hf_new = hf.sequences[:, 1 if encdec else ids.shape[1]:]  # drop the start token / the prompt
        out = beam_search(ours, ids, attention_mask=mask, **kw)
        where = f"{case} length_penalty={penalty} early_stopping={early!r}"
        assert torch.equal(out.sequences, hf_new), \
            f"{where}:\nlmforge:      {out.sequences.tolist()}\ntransformers: {hf_new.tolist()}"
        diff = (out.scores - hf.sequences_scores).abs().max().item()
        assert diff <= 1e-4, f"{where}: scores differ from sequences_scores by {diff:.2e}"
        assert out.sequences.shape[0] == 2 * returned and out.scores.shape == (2 * returned,)
        by_prompt = out.scores.view(2, returned)
        assert bool((by_prompt[:, :-1] >= by_prompt[:, 1:]).all()), f"{where}: not best first {by_prompt}"
        ended = out.lengths < NEW  # ends before NEW only by emitting eos, which is the last token kept
        last = out.sequences[torch.arange(len(ended)), out.lengths - 1]
        assert bool((last[ended] == eos).all()), f"{where}: a short hypothesis does not end in eos {eos}"
        lengths.update(out.lengths.tolist())
    assert min(lengths) < NEW and max(lengths) == NEW, f"{case}: hypothesis lengths {sorted(lengths)} " \
        f"with eos {eos}: finished hypotheses and full-length ones should both occur"


@pytest.mark.parametrize("case", ["gpt2", "t5"])
def test_one_beam_is_greedy(case, pairs):
    ours, _ = pairs(case, hf=False)
    ids, mask = _batch(ours)
    eos = _frequent_token(ours, ids, mask)
    greedy = lmforge.generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, temperature=0.0, eos_token_id=eos,
                              pad_token_id=PAD)
    assert greedy.shape[1] < NEW or bool((greedy == eos).any()), f"{case}: eos {eos} never fired: {greedy.tolist()}"
    for penalty, early in SETTINGS:
        if early == "never" and penalty > 0:  # may look past an eos for a longer, better hypothesis
            continue
        out = beam_search(ours, ids, attention_mask=mask, num_beams=1, max_new_tokens=NEW, length_penalty=penalty,
                          early_stopping=early, eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(out.sequences, greedy), f"{case} length_penalty={penalty} early_stopping={early!r}:\n" \
            f"beam:   {out.sequences.tolist()}\ngreedy: {greedy.tolist()}"


@pytest.mark.parametrize("case", ["llama", "bart"])
def test_no_cache_equals_cache(case, pairs):
    ours, _ = pairs(case, hf=False)
    ids, mask = _batch(ours)
    eos = _frequent_token(ours, ids, mask)
    ours.train()  # beam_search must switch to eval (dropout) and restore the mode
    kw = dict(num_beams=3, max_new_tokens=NEW, length_penalty=2.0, early_stopping="never", num_return_sequences=3,
              eos_token_id=eos, pad_token_id=PAD, attention_mask=mask, **_start(ours))
    cached, recomputed = beam_search(ours, ids, **kw), beam_search(ours, ids, use_cache=False, **kw)
    assert ours.training
    ours.eval()
    assert torch.equal(cached.sequences, recomputed.sequences), f"{case}:\ncache:    {cached.sequences.tolist()}\n" \
        f"no cache: {recomputed.sequences.tolist()}"
    torch.testing.assert_close(cached.scores, recomputed.scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["llama", "t5"])
def test_scores_are_length_normalised_log_probabilities(case, pairs):
    """The reference: one teacher-forced forward over each returned hypothesis, alone (no padding, no cache);
    and padded batch rows return what the prompt returns alone."""
    ours, _ = pairs(case, hf=False)
    ids, mask = _batch(ours)
    eos = _frequent_token(ours, ids, mask)
    penalty = 2.0
    batch = beam_search(ours, ids, attention_mask=mask, num_beams=3, max_new_tokens=NEW, length_penalty=penalty,
                        num_return_sequences=3, eos_token_id=eos, pad_token_id=PAD, **_start(ours))
    for row in range(2):
        prompt = ids[row, mask[row].bool()][None]  # (1, T_row)
        alone = beam_search(ours, prompt, num_beams=3, max_new_tokens=NEW, length_penalty=penalty,
                            num_return_sequences=3, eos_token_id=eos, pad_token_id=PAD, **_start(ours))
        rows = slice(3 * row, 3 * row + 3)
        n = alone.sequences.shape[1]
        assert torch.equal(batch.sequences[rows, :n], alone.sequences), f"{case} row {row}: padding changed beams"
        torch.testing.assert_close(batch.scores[rows], alone.scores, rtol=0, atol=1e-4)
        for hyp, score, length in zip(alone.sequences, alone.scores, alone.lengths.tolist()):
            new = hyp[:length][None]  # (1, L)
            with torch.no_grad():
                if ours.config.arch == "decoder":
                    full = torch.cat([prompt, new], 1)
                    logits = ours(full, positions=positions_from_mask(torch.ones_like(full))).logits
                    logits = logits[:, prompt.shape[1] - 1:-1]  # (1, L, V): predictions of the new tokens
                else:
                    start = torch.full((1, 1), ours.config.pad_token_id)
                    logits = ours(prompt, torch.cat([start, new[:, :-1]], 1)).logits
            logp = torch.log_softmax(logits.float(), -1).gather(-1, new[..., None]).sum()
            expected = logp / length**penalty
            assert abs(score.item() - expected.item()) <= 1e-4, f"{case}: score {score.item()} but the " \
                f"hypothesis has log-probability {logp.item()} over {length} tokens -> {expected.item()}"


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=0), r"num_beams=0 must be an integer >= 1"),
    (dict(num_beams=2.0), r"num_beams=2.0 must be an integer"),
    (dict(num_return_sequences=5), r"num_return_sequences=5 must be an integer in \[1, num_beams=4\]"),
    (dict(early_stopping="sometimes"), r"early_stopping='sometimes' must be True, False or 'never'"),
    (dict(length_penalty=float("nan")), r"length_penalty=nan must be a finite number"),
    (dict(eos_token_id=[7, 999]), r"eos_token_id 999 must be an integer token id in \[0, 256\)"),
    (dict(max_new_tokens=0), r"max_new_tokens=0 must be >= 1 for beam search"),
])
def test_invalid_arguments(kwargs, match, pairs):
    ours, _ = pairs("gpt2", hf=False)
    ids, mask = _batch(ours)
    args = dict(num_beams=4, max_new_tokens=NEW, attention_mask=mask) | kwargs
    with pytest.raises(ValueError, match=match):
        beam_search(ours, ids, **args)


def test_rejects_encoders_and_wrong_padding(pairs, make_model):
    with pytest.raises(ValueError, match="needs a decoder or encoder-decoder language model, not arch='encoder'"):
        beam_search(make_model("debug-bert"), torch.ones(1, 3, dtype=torch.long), num_beams=2, max_new_tokens=2)
    ours, _ = pairs("gpt2", hf=False)
    ids, mask = _batch(ours)
    with pytest.raises(ValueError, match="padding on the right"):
        beam_search(ours, ids, attention_mask=mask.flip(1), num_beams=2, max_new_tokens=2)
