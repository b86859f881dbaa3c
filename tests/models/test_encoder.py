"""Encoder-only models (BERT-style): bidirectional attention, every head, and that each objective learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.models.heads import mean_pool

VOCAB = 256


def _model(**overrides) -> torch.nn.Module:
    return lmforge.build_model(lmforge.ModelConfig.from_preset("debug-bert", **overrides), seed=0)


def test_attention_is_bidirectional():
    model = _model().eval()
    ids = torch.randint(5, VOCAB, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[0, 0], b[0, 0]), "the first token must see the last one in an encoder"


def test_padding_keys_do_not_change_real_tokens():
    model = _model().eval()
    ids = torch.randint(5, VOCAB, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        alone = model(ids).logits
        with_pad = model(padded, attention_mask=mask).logits[:, :6]
    assert (alone - with_pad).abs().max() < 1e-5


def test_heads_have_the_documented_shapes():
    ids = torch.randint(0, VOCAB, (3, 7))
    assert _model()(ids).logits.shape == (3, 7, VOCAB)
    out = _model(head="sequence_classification", n_labels=5, pooler=True, head_transform=False,
                 lm_head_bias=False)(ids)
    assert out.logits.shape == (3, 5) and out.pooled.shape == (3, 64)
    assert _model(head="token_classification", n_labels=9)(ids).logits.shape == (3, 7, 9)
    bare = _model(head="none", pooler=True)(ids)
    assert bare.logits is None and bare.hidden.shape == (3, 7, 64) and bare.pooled.shape == (3, 64)


def test_mean_pool_ignores_padding_and_normalises():
    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    expected = F.normalize(hidden[0, :2].mean(0), dim=-1)
    assert torch.allclose(pooled[0], expected, atol=1e-6)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))


def _mlm_loss(model, ids, generator):
    masked = torch.rand(ids.shape, generator=generator) < 0.3
    inputs = ids.masked_fill(masked, 1)  # token 1 plays [MASK]
    logits = model(inputs, token_type_ids=(torch.arange(ids.shape[1]) >= 6).long().expand_as(ids)).logits
    return F.cross_entropy(logits[masked], ids[masked])


def _classify_loss(model, ids, generator):
    labels = ids[:, 0] % model.config.n_labels  # learnable from the first token
    return F.cross_entropy(model(ids).logits, labels)


def _tag_loss(model, ids, generator):
    labels = ids % model.config.n_labels
    return F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())


OBJECTIVES = {
    "masked_lm": ({}, _mlm_loss),
    "sequence_classification": (dict(head="sequence_classification", n_labels=3, pooler=True,
                                     head_transform=False, lm_head_bias=False), _classify_loss),
    "token_classification": (dict(head="token_classification", n_labels=4, head_transform=False,
                                  lm_head_bias=False), _tag_loss),
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_learns_and_reaches_every_parameter(objective):
    overrides, loss_fn = OBJECTIVES[objective]
    model = _model(dropout=0.0, attention={"n_head": 4, "dropout": 0.0}, **overrides).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (8, 12), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        loss = loss_fn(model, ids, torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert not missing, f"{objective}: no gradient reaches {missing}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"{objective}: loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
