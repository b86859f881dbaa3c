"""Block wiring: pre-norm x + f(norm(x)) and post-norm norm(x + f(x)), recomputed by hand from the block's
own submodules, with and without cross-attention and with an MoE feed-forward."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.nn.attention import AttentionMask, build_attention_mask
from lmforge.nn.block import Block
from lmforge.nn.positions import make_positions

B, T, S, D = 2, 6, 5, 64


def _cfg(placement: str, **overrides) -> ModelConfig:
    return ModelConfig.from_preset("debug-llama", **{"norm.placement": placement, **overrides})


def _block(cfg: ModelConfig, cross: bool = False) -> Block:
    torch.manual_seed(0)
    block = Block(cfg, cross=cross).eval()
    with torch.no_grad():  # norm gains away from 1 so a skipped norm cannot go unnoticed
        for name, p in block.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape) + 0.5)
            elif name.startswith("mlp.w_"):  # MoE experts are allocated empty
                p.normal_(0.0, 0.1)
    return block


def _inputs(cfg: ModelConfig):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g)
    memory = torch.randn(B, S, D, generator=g)
    positions = torch.arange(T)[None].expand(B, T)
    rope = make_positions(cfg, bidirectional=False).rotary(positions)
    mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(T), causal=True, dtype=x.dtype)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, -2:] = 0
    memory_mask = build_attention_mask(q_idx=torch.arange(T), k_idx=torch.arange(S), causal=False, dtype=x.dtype,
                                       key_padding=pad)
    return x, memory, rope, mask, memory_mask


def _manual(block: Block, x, memory, rope, mask, memory_mask, pre: bool) -> torch.Tensor:
    attn = lambda h: block.attn(h, mask, rope=rope)  # noqa: E731
    cross = lambda h: block.cross_attn(h, memory_mask, memory=memory)  # noqa: E731
    mlp = (lambda h: block.mlp(h)[0]) if block.is_moe else block.mlp
    steps = [(block.attn_norm, attn)]
    if block.cross:
        steps.append((block.cross_norm, cross))
    steps.append((block.mlp_norm, mlp))
    for norm, f in steps:
        x = x + f(norm(x)) if pre else norm(x + f(x))
    return x


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_block_wiring_matches_formula(placement, cross, moe):
    cfg = _cfg(placement, **({"moe": {"n_experts": 4, "top_k": 2}} if moe else {}))
    block = _block(cfg, cross=cross)
    x, memory, rope, mask, memory_mask = _inputs(cfg)
    with torch.no_grad():
        out, aux = block(x, mask, rope=rope, memory=memory, memory_mask=memory_mask)
        expected = _manual(block, x, memory, rope, mask, memory_mask, pre=placement == "pre")
    formula = "x + f(norm(x))" if placement == "pre" else "norm(x + f(x))"
    diff = (out - expected).abs().max().item()
    assert diff < 1e-6, f"{placement}-norm block (cross={cross}, moe={moe}) is not {formula}: off by {diff:.2e}"
    assert set(aux) == ({"moe_load_balance", "moe_router_z"} if moe else set()), f"aux losses {sorted(aux)}"


def test_pre_and_post_norm_differ():
    """Same weights, other placement: if both gave the same output the wiring tests would prove nothing."""
    pre, post = _block(_cfg("pre")), _block(_cfg("post"))
    post.load_state_dict(pre.state_dict())
    x, _, rope, mask, _ = _inputs(_cfg("pre"))
    with torch.no_grad():
        assert (pre(x, mask, rope=rope)[0] - post(x, mask, rope=rope)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_cross_attention_block_uses_memory(placement):
    cfg = _cfg(placement)
    block = _block(cfg, cross=True)
    x, memory, rope, mask, memory_mask = _inputs(cfg)
    with torch.no_grad():
        out = block(x, mask, rope=rope, memory=memory, memory_mask=memory_mask)[0]
        other = block(x, mask, rope=rope, memory=torch.randn_like(memory), memory_mask=memory_mask)[0]
        padded = memory.clone()
        padded[1, -2:] += 10.0  # only memory positions masked as padding
        same = block(x, mask, rope=rope, memory=padded, memory_mask=memory_mask)[0]
    assert (out - other).abs().max() > 1e-3, f"{placement}: the cross-attention block ignores its memory"
    assert torch.allclose(out, same, atol=1e-5), f"{placement}: padded memory positions changed the output"


def test_cross_attention_without_memory_mask_sees_all_memory():
    """memory_mask defaults to None: every memory key visible (it used to crash on `None.is_causal`)."""
    cfg = _cfg("pre")
    block = _block(cfg, cross=True)
    x, memory, rope, mask, _ = _inputs(cfg)
    with torch.no_grad():
        out = block(x, mask, rope=rope, memory=memory)[0]
        explicit = block(x, mask, rope=rope, memory=memory, memory_mask=AttentionMask())[0]
    assert torch.equal(out, explicit), "memory_mask=None must mean 'no mask'"


def test_self_attention_block_has_no_cross_attention():
    block = _block(_cfg("pre"))
    assert not hasattr(block, "cross_attn") and not hasattr(block, "cross_norm"), "self-only block built cross parts"
