"""Mixture of experts: the sorted dispatch against the oracle loop (values and gradients), the auxiliary
losses against their formulas and transformers, and the whole block against transformers' Mixtral block."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import MLPConfig, MoEConfig
from lmforge.nn.moe import MoE, load_balancing_loss, router_z_loss

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)

D, FF, N = 16, 24, 20  # model dim, expert hidden dim, tokens


def _moe(n_experts: int, top_k: int, *, gated: bool = True, act: str = "silu", seed: int = 0,
         **moe_kw) -> MoE:
    moe = MoE(D, MLPConfig(d_ff=FF, activation=act, gated=gated), MoEConfig(n_experts=n_experts, top_k=top_k,
                                                                         **moe_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():  # expert weights are allocated empty; initialisation lives in models/init.py
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


EXPERT_CASES = [(4, 1), (4, 2), (4, 4), (8, 2), (8, 3), (1, 1)]


def _grads(moe: MoE, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, fn_name: str, upstream):
    moe.zero_grad()
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    y = getattr(moe, fn_name)(x, weights, chosen)
    (y * upstream).sum().backward()
    grads = {"x": x.grad, "weights": weights.grad}
    grads.update({name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None})
    return y.detach(), grads


def _check_dispatch(moe: MoE, x, weights, chosen, label: str) -> None:
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fast, fast_grads = _grads(moe, x, weights, chosen, "dispatch", upstream)
    ref, ref_grads = _grads(moe, x, weights, chosen, "dispatch_reference", upstream)
    # relative to the output's size (|y| up to ~5 here): the expert matmuls see different row counts
    diff = ((fast - ref).abs().max() / ref.abs().max().clamp(min=1)).item()
    assert diff < 1e-6, f"{label}: sorted dispatch differs from the oracle loop by {diff:.2e} (rel)"
    assert set(fast_grads) == set(ref_grads), f"{label}: gradients reach {sorted(fast_grads)} vs {sorted(ref_grads)}"
    for name in ref_grads:
        # relative to the gradient's size: both paths sum the same terms in a different order (fp32)
        gdiff = ((fast_grads[name] - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp(min=1)).item()
        assert gdiff < 1e-5, f"{label}: d loss / d {name} differs between dispatch and oracle by {gdiff:.2e} (rel)"


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("n_experts,top_k", EXPERT_CASES, ids=lambda v: str(v))
def test_dispatch_matches_reference(n_experts, top_k, gated, act):
    moe = _moe(n_experts, top_k, gated=gated, act=act)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    _, _, weights, chosen = moe.route(x)
    _check_dispatch(moe, x, weights.detach(), chosen, f"E={n_experts} k={top_k} gated={gated} {act}")


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dispatch_matches_reference_with_idle_experts(top_k, gated):
    """Experts 1, 4 and 5 of 6 receive no token: the fast path must skip them without shifting the others."""
    n_experts, used = 6, [0, 2, 3]
    moe = _moe(n_experts, top_k, gated=gated)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g)
    chosen = torch.stack([torch.tensor(used)[torch.randperm(len(used), generator=g)[:top_k]] for _ in range(N)])
    weights = torch.softmax(torch.randn(N, top_k, generator=g), dim=-1)
    counts = torch.bincount(chosen.flatten(), minlength=n_experts)
    assert (counts[[1, 4, 5]] == 0).all() and (counts[used] > 0).all(), f"test setup: counts {counts.tolist()}"
    _check_dispatch(moe, x, weights, chosen, f"idle experts, k={top_k}")


def test_route_picks_top_k_and_normalises():
    x = torch.randn(N, D)
    for normalize in (True, False):
        moe = _moe(4, 2, normalize_top_k=normalize)
        logits, probs, weights, chosen = moe.route(x)
        assert torch.allclose(probs, torch.softmax(logits, -1)), "probs must be the router softmax"
        assert torch.equal(chosen, probs.topk(2, dim=-1).indices), "chosen must be the two most probable experts"
        raw = probs.gather(-1, chosen)
        expected = raw / raw.sum(-1, keepdim=True) if normalize else raw
        assert torch.allclose(weights, expected), f"normalize_top_k={normalize}: wrong gate weights"


# -- auxiliary losses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (8, 2), (8, 8)], ids=lambda v: str(v))
def test_load_balancing_loss_matches_mixtral(n_experts, top_k):
    moe = _moe(n_experts, top_k)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    logits, probs, _, chosen = moe.route(x)
    ours = load_balancing_loss(probs, chosen, n_experts)
    theirs = load_balancing_loss_func((logits,), n_experts, top_k)
    assert abs(ours.item() - theirs.item()) < 1e-6, \
        f"E={n_experts} k={top_k}: load-balancing loss {ours.item():.6f} vs transformers' {theirs.item():.6f}"


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (8, 3), (8, 8)], ids=lambda v: str(v))
def test_load_balancing_loss_is_k_for_uniform_balanced_routing(n_experts, top_k):
    """Uniform probabilities and every expert chosen equally often in each slot: E * sum f * P = k."""
    n_tokens = 2 * n_experts
    probs = torch.full((n_tokens, n_experts), 1.0 / n_experts)
    chosen = torch.tensor([[(t + j) % n_experts for j in range(top_k)] for t in range(n_tokens)])
    loss = load_balancing_loss(probs, chosen, n_experts).item()
    assert loss == pytest.approx(top_k, abs=1e-6), f"uniform balanced routing: loss {loss}, expected k={top_k}"
    # collapsed routing (every token to experts 0..k-1 with all the probability there) is penalised
    collapsed = torch.zeros(n_tokens, n_experts)
    collapsed[:, :top_k] = 1.0 / top_k
    worst = load_balancing_loss(collapsed, torch.arange(top_k).expand(n_tokens, top_k), n_experts).item()
    assert worst == pytest.approx(n_experts, abs=1e-5) and (worst > loss or top_k == n_experts), \
        f"collapsed routing: loss {worst}, expected E={n_experts}"


def test_router_z_loss_matches_st_moe_formula():
    logits = torch.randn(N, 8, generator=torch.Generator().manual_seed(5)) * 4
    expected = sum(float(torch.log(torch.exp(row.double()).sum())) ** 2 for row in logits) / N
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6), \
        "router z-loss must be mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022, eq. 5)"
    big = torch.full((2, 4), 200.0)  # exp overflows in fp32 unless computed stably
    assert router_z_loss(big).item() == pytest.approx((200 + torch.log(torch.tensor(4.0)).item()) ** 2, rel=1e-6)


# -- the whole block -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts,top_k", [(4, 2), (8, 2), (4, 1), (4, 4)], ids=lambda v: str(v))
def test_moe_block_matches_mixtral(n_experts, top_k):
    moe = _moe(n_experts, top_k, gated=True, act="silu")
    config = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=n_experts,
                           num_experts_per_tok=top_k, hidden_act="silu", router_jitter_noise=0.0)
    config._experts_implementation = "eager"  # the plain loop; the block is used standalone, not via from_config
    hf = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([moe.w_gate, moe.w_up], dim=1))  # (E, 2F, D)
        hf.experts.down_proj.copy_(moe.w_down)  # (E, D, F)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, _ = moe(x)
        theirs = hf(x.clone())
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"E={n_experts} k={top_k}: MoE differs from MixtralSparseMoeBlock by {diff:.2e}"


def test_forward_returns_weighted_aux_losses():
    moe = _moe(4, 2, aux_loss_coef=0.3, z_loss_coef=0.07)
    x = torch.randn(2, 5, D)
    y, aux = moe(x)
    assert y.shape == x.shape
    assert set(aux) == {"moe_load_balance", "moe_router_z"}, f"aux loss names {sorted(aux)}"
    logits, probs, weights, chosen = moe.route(x.reshape(-1, D))
    assert torch.allclose(y, moe.dispatch_reference(x.reshape(-1, D), weights, chosen).view_as(x), atol=1e-6)
    lb, z = load_balancing_loss(probs, chosen, 4), router_z_loss(logits)
    assert aux["moe_load_balance"].item() == pytest.approx(0.3 * lb.item(), rel=1e-6), "aux_loss_coef not applied"
    assert aux["moe_router_z"].item() == pytest.approx(0.07 * z.item(), rel=1e-6), "z_loss_coef not applied"
    # the losses train the router
    (aux["moe_load_balance"] + aux["moe_router_z"]).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0, "aux losses reach no router"
    _, silent = _moe(4, 2, aux_loss_coef=0.0, z_loss_coef=0.0)(x)
    assert all(v.item() == 0 for v in silent.values()), f"zero coefficients must give zero losses: {silent}"
