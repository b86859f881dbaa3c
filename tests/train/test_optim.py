"""AdamW parameter groups, the fused kernel against the reference loop, and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lmforge
from lmforge.train.optim import OptimConfig, clip_grad_norm, make_optimizer, param_groups


def debug_model(preset: str = "debug-llama") -> nn.Module:
    return lmforge.build_model(lmforge.ModelConfig.from_preset(preset), seed=0)


def names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


@pytest.mark.parametrize("preset", ["debug-llama", "debug-gpt2", "debug-mixtral", "debug-t5"])
def test_every_trainable_param_in_exactly_one_group(preset):
    model = debug_model(preset)
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter appears twice"
    assert set(ids) == {id(p) for p in model.parameters()}, "a trainable parameter is in no group"


def test_decay_goes_on_matrices_only():
    model = debug_model("debug-gpt2")  # learned positions, biases, LayerNorm, tied head
    by_group = names_by_group(model, param_groups(model, 0.1))
    decay, no_decay = by_group["decay"], by_group["no_decay"]
    assert any(n.endswith("qkv.weight") for n in decay)
    assert all(n.endswith("weight") for n in decay), f"a bias or gain would be decayed: {decay}"
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert embeddings and {f"{n}.weight" for n in embeddings} <= no_decay, "embedding tables are not decayed"
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in decay)
    assert any(n.endswith("bias") for n in no_decay)


def test_group_settings_and_frozen_params_left_out():
    model = debug_model("debug-mixtral")  # untied head, MoE experts (3-D)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    groups = param_groups(model, 0.05)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.05), ("no_decay", 0.0)]
    decay = names_by_group(model, groups)["decay"]
    assert "head.proj.weight" in decay and "blocks.1.mlp.w_up" in decay
    assert "blocks.0.attn.qkv.weight" not in decay | names_by_group(model, groups)["no_decay"]


def test_make_optimizer_picks_fused_on_cpu_and_honours_config():
    model = debug_model()
    opt = make_optimizer(model, OptimConfig(lr=1e-3, betas=[0.8, 0.9]))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True, "fused AdamW exists on CPU in torch >= 2.4"
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.param_groups[0]["lr"] == 1e-3
    assert make_optimizer(model, OptimConfig(fused=False)).defaults["fused"] is False


def train_steps(fused: bool, steps: int = 5) -> list[torch.Tensor]:
    model = debug_model()
    opt = make_optimizer(model, OptimConfig(lr=1e-2, fused=fused))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        model(ids).logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def test_fused_adamw_matches_for_each_adamw_fp32():
    # Same math, different summation order; measured max difference 8e-7 after 5 steps at lr 1e-2.
    fused, reference = train_steps(True), train_steps(False)
    worst = max((a - b).abs().max().item() for a, b in zip(fused, reference))
    assert worst <= 1e-5, f"fused and for-each AdamW differ by {worst:.2e} > 1e-5"
    initial = list(debug_model().parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(reference, initial))
    assert moved > 1e-3, "the comparison must come after real updates"


def test_fused_adamw_bf16_matches_fp32_math_with_bf16_storage():
    # The for-each path rounds every intermediate to bf16 (it differs from fused by up to ~0.08 here), so
    # the oracle is AdamW (Loshchilov & Hutter 2019, Algorithm 2) computed in fp32 from the bf16 weight and
    # moments, rounded to bf16 after each step. Tolerance: one bf16 ulp of the weight.
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 64, generator=g).bfloat16()
    grads = [torch.randn(64, 64, generator=g).bfloat16() for _ in range(5)]

    p = nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, fused=True)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()

    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, grad in enumerate(grads, 1):
        gf = grad.float()
        mf = b1 * m.float() + (1 - b1) * gf
        vf = b2 * v.float() + (1 - b2) * gf * gf
        wf = w.float() * (1 - lr * wd) - lr * (mf / (1 - b1**t)) / ((vf / (1 - b2**t)).sqrt() + eps)
        w, m, v = wf.bfloat16(), mf.bfloat16(), vf.bfloat16()

    diff = (p.detach().float() - w.float()).abs()
    ulp = torch.finfo(torch.bfloat16).eps * w.float().abs()
    assert (diff <= ulp).all(), f"fused bf16 AdamW is off the reference by up to {diff.max().item():.2e}"
    assert (w.float() - w0.float()).abs().max() > 1e-2, "the comparison must come after real updates"


def test_clip_grad_norm_returns_pre_clip_norm_and_clips():
    w = nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([w], 1.0) == pytest.approx(5.0)
    assert w.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([w], 0.0) == pytest.approx(5.0), "max_norm 0 measures only"
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]))
    assert clip_grad_norm([w], 10.0) == pytest.approx(5.0)
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0, 0.0, 0.0])), "below the limit: untouched"


def test_clip_grad_norm_is_global_over_a_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model(torch.randn(5, 3)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert clip_grad_norm(model, 1e-3) == pytest.approx(expected, rel=1e-5)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert clipped == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clip_grad_norm_reports_non_finite_instead_of_raising(bad):
    w = nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([1.0, bad])
    norm = clip_grad_norm([w], 1.0)
    assert not math.isfinite(norm)
    assert (math.isinf(norm) if math.isinf(bad) else math.isnan(norm))


def test_clip_grad_norm_without_grads_is_zero():
    assert clip_grad_norm(nn.Linear(2, 2), 1.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(lr=0.0), "lr must be > 0"), (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
     (dict(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\)"), (dict(eps=0.0), "eps must be > 0"),
     (dict(grad_clip=-1.0), "grad_clip must be >= 0")],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)
