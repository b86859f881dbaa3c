"""The decoder-only model: construction on meta, initialisation, and that it can learn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.models import model_class

FAMILIES = ["debug-gpt2", "debug-llama", "debug-mistral", "debug-mixtral", "debug-qwen2"]

# Parameter counts that transformers reports for the upstream models each preset cites.
UPSTREAM_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_PARAMS))
def test_presets_reproduce_upstream_parameter_counts(name):
    cfg = lmforge.ModelConfig.from_preset(name)
    with torch.device("meta"):  # no memory, even for 47B parameters
        model = model_class(cfg)(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == UPSTREAM_PARAMS[name], f"{name}: {n:,} parameters, upstream has {UPSTREAM_PARAMS[name]:,}"


def test_build_initialises_as_documented():
    cfg = lmforge.ModelConfig.from_preset("debug-gpt2", n_layer=4, d_model=128, mlp={"d_ff": 512})
    model = lmforge.build_model(cfg, seed=0)
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert params["embed.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    residual = params["blocks.0.mlp.down.weight"].std().item()
    assert residual == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.05), "residual projections are scaled down"
    assert torch.all(params["blocks.0.attn_norm.weight"] == 1) and torch.all(params["blocks.0.attn.qkv.bias"] == 0)
    again = lmforge.build_model(cfg, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters())), "seeded init repeats"


def test_padded_vocab_keeps_logits_at_vocab_size():
    cfg = lmforge.ModelConfig.from_preset("debug-llama", vocab_size=250, pad_vocab_multiple=64)
    model = lmforge.build_model(cfg)
    assert model.embed.weight.shape[0] == 256
    assert model(torch.randint(0, 250, (1, 5))).logits.shape == (1, 5, 250)


def test_tied_head_shares_the_embedding():
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-llama"))
    assert model.head.proj is None
    untied = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-mistral"))
    assert untied.head.proj is not None and untied.head.proj.weight.data_ptr() != untied.embed.weight.data_ptr()


def _train(model: torch.nn.Module, steps: int = 15) -> tuple[list[float], set[str]]:
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, no_grad = [], set()
    model.train()
    for step in range(steps):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
        opt.step()
        losses.append(loss.item())
    return losses, no_grad


VARIANTS = {name: {} for name in FAMILIES} | {
    # Blocks chosen by config alone: the same classes serve other families' choices.
    "alibi-postnorm-geglu": ("debug-llama", dict(
        position={"kind": "alibi"}, norm={"kind": "layer", "placement": "post"},
        mlp={"activation": "gelu", "gated": True}, final_norm=False)),
    "sinusoidal-relu-mqa": ("debug-llama", dict(
        position={"kind": "sinusoidal"}, mlp={"activation": "relu", "gated": False},
        attention={"n_kv_head": 1}, embed_scale=8.0)),
    "relative-bias": ("debug-llama", dict(position={"kind": "relative"}, attention={"softmax_scale": 1.0})),
    "dropout": ("debug-gpt2", dict(dropout=0.1, attention={"n_head": 4, "dropout": 0.1})),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_few_steps_lower_the_loss_and_reach_every_parameter(variant):
    preset, overrides = (variant, {}) if variant in FAMILIES else VARIANTS[variant]
    cfg = lmforge.ModelConfig.from_preset(preset, **overrides)
    model = lmforge.build_model(cfg, seed=0)
    losses, no_grad = _train(model)
    assert not no_grad, f"{variant}: parameters without gradient: {sorted(no_grad)}"
    assert losses[-1] < 0.7 * losses[0], f"{variant}: loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_moe_returns_differentiable_aux_losses():
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-mixtral"), seed=0)
    out = model(torch.randint(0, 256, (2, 8)))
    assert set(out.aux_losses) == {"moe_load_balance", "moe_router_z"}
    sum(out.aux_losses.values()).backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_dropout_only_in_training():
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-gpt2", dropout=0.2), seed=0)
    ids = torch.randint(0, 256, (1, 8))
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_attention_mask_shape_is_checked():
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-llama"))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 4\) but must be"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))


@pytest.mark.parametrize("preset", ["debug-llama", "debug-gpt2", "debug-mistral"])
def test_packed_documents_equal_separate_runs(preset):
    """document_ids + restarting positions make a packed row behave like separate sequences."""
    model = lmforge.build_model(lmforge.ModelConfig.from_preset(preset), seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    docs = [torch.randint(0, 256, (1, n)) for n in (5, 9, 4)]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    positions = torch.cat([torch.arange(d.shape[1])[None] for d in docs], dim=1)
    with torch.no_grad():
        together = model(packed, positions=positions, document_ids=document_ids).logits
        apart = torch.cat([model(d).logits for d in docs], dim=1)
        leaky = model(packed, positions=positions).logits
    assert (together - apart).abs().max() < 1e-5
    assert (leaky - apart).abs().max() > 1e-3, "without document_ids the documents must see each other"
