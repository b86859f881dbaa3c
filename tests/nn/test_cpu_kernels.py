"""The fused CPU kernels of bf16 work (lmforge/nn/kernels/cpu.c) against their formulas in float64: RMSNorm, RoPE,
SwiGLU, GELU (tanh), MatmulAttention's softmax and the cross-entropy, forward and backward; when the modules
take them; the build, its cache and its fallback; and a bf16 training step with and without them."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.nn import kernels as kernels_module
from lmforge.nn.attention import AttentionMask, MatmulAttention, eager_attention, matmul_attention
from lmforge.nn.kernels import KERNELS, cpu_kernels, use_kernel
from lmforge.nn.mlp import FusedGeluTanh, FusedSwiGLU
from lmforge.nn.norms import FusedRMSNorm, rms_norm, rms_norm_reference
from lmforge.nn.positions import RotaryPositions, apply_rope_reference, rope_heads
from lmforge.train.loss import FusedCrossEntropy, token_loss, token_loss_reference

BUILDABLE = platform.system() == "Linux" and shutil.which("cc") is not None
needs_kernels = pytest.mark.skipif(not BUILDABLE, reason="the fused CPU kernels build on Linux with a C compiler")
pytestmark = needs_kernels

ROUNDING = 2.0**-8  # bf16's unit roundoff: one rounding to nearest errs at most this much, relatively


def _bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def test_kernels_build_here_and_the_switch_chooses_them(monkeypatch):
    assert cpu_kernels() is not None, "a Linux machine with cc must build lmforge/nn/kernels/cpu.c"
    assert all(use_kernel(name) for name in KERNELS)
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    assert not any(use_kernel(name) for name in KERNELS)
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "rope, cross_entropy")
    assert [name for name in KERNELS if use_kernel(name)] == ["rope", "cross_entropy"]
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "rope,flash")
    with pytest.raises(ValueError, match=r"names unknown kernels \['flash'\]; use 1 \(all\), 0 \(none\)"):
        use_kernel("rope")


def test_build_is_cached_per_source_and_rebuilt_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    compiler = shutil.which("cc")
    path = kernels_module.build(compiler)
    assert path.is_file() and path.is_relative_to(tmp_path / "kernels")
    built = path.stat().st_mtime_ns
    assert kernels_module.build(compiler) == path and path.stat().st_mtime_ns == built, "rebuilt a cached library"
    path.unlink()
    assert kernels_module.build(compiler) == path and path.is_file()
    assert list(path.parent.iterdir()) == [path], "no temporary files left behind"


def test_a_failed_build_warns_and_falls_back(monkeypatch):
    monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that fails
    with pytest.warns(UserWarning, match="building the fused CPU kernels with /bin/false failed"):
        assert kernels_module._load() is None


@pytest.mark.parametrize("rows,dim", [(1, 8), (33, 37), (512, 384)])
def test_rms_norm_matches_the_reference_in_float64(rows, dim):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, dim, generator=g) * 3).requires_grad_()
    w = (torch.rand(dim, generator=g) + 0.5).requires_grad_()
    grad = torch.randn(rows, dim, generator=g)
    y = FusedRMSNorm.apply(x, w, 1e-6)
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = rms_norm_reference(x64, w64, 1e-6)
    ref.backward(grad.double())
    for name, got, want in (("y", y, ref), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad)):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e} vs float64 (fp32 arithmetic gives ~1e-7)"


def test_rms_norm_takes_the_kernel_only_under_cpu_bf16_autocast():
    x = torch.randn(4, 6, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    assert "RMSNormFunction" in type(rms_norm(x, w, 1e-6).grad_fn).__name__  # fp32: the bit-exact path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, w, 1e-6)
    assert "FusedRMSNorm" in type(y.grad_fn).__name__ and y.dtype == torch.float32 and y.shape == x.shape


def test_swiglu_is_the_formula_rounded_once():
    """silu(g) u in fp32, rounded to bf16 once: within half a bf16 step of float64, where torch's two roundings
    (silu, then the product) reach a whole step."""
    gate, up, grad = (_bf16(4, 33, 96, seed=s, scale=3).requires_grad_() for s in range(3))
    out = FusedSwiGLU.apply(gate, up)
    out.backward(grad.detach())
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = F.silu(g64) * u64
    ref.backward(grad.detach().double())
    for name, got, want in (("out", out, ref), ("d gate", gate.grad, g64.grad), ("d up", up.grad, u64.grad)):
        assert got.dtype == torch.bfloat16
        _assert_rounded_once(name, got, want)
    torch_rel = ((F.silu(gate.detach()) * up.detach()).double() - ref).abs().div(ref.abs().clamp(min=1e-30)).max()
    assert torch_rel > ROUNDING, "the comparison is meaningful: torch's unfused ops round twice"


def _assert_rounded_once(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """got (bf16) is want (float64) rounded once: within the unit roundoff, and equal to want rounded to bf16
    except where fp32 arithmetic lands on the other side of a rounding boundary (rare)."""
    rel = ((got.double() - want).abs() / want.abs().clamp(min=1e-30)).max().item()
    assert rel <= ROUNDING * 1.001, f"{name}: {rel:.2e} relative error, more than one rounding to bf16"
    differs = (got != want.to(torch.bfloat16)).float().mean().item()
    assert differs < 0.01, f"{name}: {differs:.1%} of the entries differ from the correctly rounded value"


def test_gated_mlp_takes_the_swiglu_kernel_in_bf16_only():
    mlp = lmforge.nn.mlp.make_mlp(32, lmforge.config.MLPConfig(d_ff=64, activation="silu", gated=True))
    x = torch.randn(2, 3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    assert "FusedSwiGLUBackward" in _graph_nodes(y)
    y32 = mlp(x)
    assert "FusedSwiGLUBackward" not in _graph_nodes(y32)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.02)


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that lead to `out`."""
    seen, todo = {}, [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.parametrize("case", ["causal", "bidirectional", "decode", "causal-prefill-after-cache"])
def test_attention_softmax_kernel_against_eager_in_float64(case):
    """bf16 attention through the kernel errs no more than the torch route (scores cast to fp32, softmax, cast
    back), both measured against eager attention in float64; masked keys get probability exactly 0."""
    B, H, D = 2, 4, 64
    shapes = {"causal": (40, 40), "bidirectional": (40, 40), "decode": (1, 57), "causal-prefill-after-cache": (9, 40)}
    T, S = shapes[case]
    q, k, v = _bf16(B, H, T, D, seed=1, scale=2), _bf16(B, H, S, D, seed=2, scale=2), _bf16(B, H, S, D, seed=3)
    causal = case.startswith("causal")
    exact_mask = AttentionMask(bias=torch.full((T, S), torch.finfo(torch.float64).min, dtype=torch.float64)
                               .triu_(S - T + 1)) if causal else AttentionMask()
    exact = eager_attention(q.double(), k.double(), v.double(), exact_mask, D**-0.5)
    fused = MatmulAttention.apply(q, k, v, None, D**-0.5, None, 0.0, causal)
    bias = exact_mask.bias.float() if causal else None
    torch_route = MatmulAttention.apply(q, k, v, bias, D**-0.5, None, 0.0, False)  # a bias tensor: no kernel
    err_fused = (fused.double() - exact).abs().max().item()
    err_torch = (torch_route.double() - exact).abs().max().item()
    assert err_fused <= 1.5 * err_torch + 1e-3, f"kernel error {err_fused:.2e} vs torch route's {err_torch:.2e}"
    if causal:  # the probabilities the kernel saved for backward: zero above the diagonal
        scores = torch.matmul(q, k.transpose(-2, -1))
        probs = cpu_kernels().attn_softmax_(scores, D**-0.5, True)
        assert (probs.float().masked_select(exact_mask.bias < 0) == 0).all()
        torch.testing.assert_close(probs.float().sum(-1), torch.ones(B, H, T), atol=0.02, rtol=0)


def test_attention_backward_with_the_kernel_matches_float64():
    B, H, T, D = 2, 4, 48, 64
    q, k, v = (_bf16(B, H, T, D, seed=s, scale=2).requires_grad_() for s in range(3))
    grad = _bf16(B, H, T, D, seed=9)
    out = matmul_attention(q, k, v, AttentionMask(is_causal=True), D**-0.5)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = eager_attention(q64, k64, v64, AttentionMask(is_causal=True), D**-0.5)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < 0.02, f"{name}: relative error {rel:.2e} (bf16 matmuls give ~5e-3)"


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_kernel_against_the_math_in_float64(eps):
    """Loss within fp32 rounding of the exact value; each gradient entry within one bf16 rounding of
    g ((1 - eps)(p - onehot(y)) + eps (p - 1 / V)); ignored rows get no gradient."""
    N, V = 70, 1000
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 4).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:7] = -100
    labels[30] = V - 1
    loss = FusedCrossEntropy.apply(logits, labels, eps, -100)
    loss.backward(torch.tensor(0.731))
    z, keep = logits.detach().double(), labels != -100
    logp = z[keep].log_softmax(-1)
    y = labels[keep]
    exact = -(1 - eps) * logp.gather(1, y[:, None]).sum() - eps / V * logp.sum()
    assert abs(loss.item() - exact.item()) < 1e-6 * exact.item(), f"loss {loss.item()} vs exact {exact.item()}"
    want = torch.zeros_like(z)
    want[keep] = 0.731 * (logp.exp() - (1 - eps) * F.one_hot(y, V).double() - eps / V)
    assert (logits.grad[~keep] == 0).all()
    _assert_rounded_once("gradient", logits.grad, want)


def test_token_loss_takes_the_kernel_for_cpu_bf16_logits_only():
    logits, labels = _bf16(2, 9, 50, seed=4, scale=3), torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        fused = token_loss(logits, labels)[0]
        ref = token_loss_reference(logits, labels)[0]
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=0)
    leaf = logits.requires_grad_()
    assert type(token_loss(leaf, labels)[0].grad_fn).__name__ == "FusedCrossEntropyBackward"
    assert type(token_loss(leaf.float(), labels)[0].grad_fn).__name__ == "ChunkedCrossEntropyBackward"


def test_nan_propagates_through_every_kernel():
    """The training loop's guard counts non-finite losses: a NaN input must not come out finite."""
    kernels = cpu_kernels()
    x = torch.randn(3, 16)
    x[1, 5] = float("nan")
    y, _ = kernels.rms_norm_fwd(x, torch.ones(16), 1e-6)
    assert y[1].isnan().all() and not y[0].isnan().any()
    g = _bf16(64)
    g[3] = float("nan")
    assert kernels.swiglu_fwd(g, _bf16(64, seed=1))[3].isnan()
    scores = _bf16(1, 1, 4, 4)
    scores[0, 0, 2, 1] = float("nan")
    probs = kernels.attn_softmax_(scores, 0.5, False)
    assert probs[0, 0, 2].isnan().all() and not probs[0, 0, 1].isnan().any()
    logits = _bf16(2, 10)
    logits[0, 3] = float("nan")
    lse, picked, _ = kernels.cross_entropy_fwd(logits, torch.tensor([1, 2]), False)
    assert lse[0].isnan() and picked[0].isnan() and lse[1].isfinite()


def test_a_bf16_training_step_with_and_without_the_kernels(monkeypatch):
    """debug-llama, one bf16 autocast step: loss and every gradient agree within bf16 noise."""
    cfg = lmforge.ModelConfig.from_preset("debug-llama")
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("LMFORGE_CPU_KERNELS", switch)
        model = lmforge.build_model(cfg, seed=0).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss_sum, n = token_loss(logits, ids[:, 1:])
        (loss_sum / n).backward()
        results[switch] = (loss_sum.item() / n.item(), {k: p.grad for k, p in model.named_parameters()})
    (loss_on, grads_on), (loss_off, grads_off) = results["1"], results["0"]
    assert abs(loss_on - loss_off) < 1e-2 * loss_off
    for name, g_on in grads_on.items():
        g_off = grads_off[name]
        cos = F.cosine_similarity(g_on.flatten(), g_off.flatten(), dim=0).item()
        assert cos > 0.99, f"{name}: gradients with and without the kernels point apart (cosine {cos:.4f})"


def test_gelu_tanh_matches_float64_and_torch():
    """Output and gradient rounded once from the float64 formula, written as x sigmoid(2 z) (= x (1 + tanh z) / 2,
    without the cancellation of 1 + tanh z for negative z, which costs even float64 its digits below x ~ -5);
    torch's bf16 kernel (fp32 inside, tanh form, so it loses the far negative tail) agrees within a bf16 step
    or 1e-4."""
    x = _bf16(4, 33, 96, seed=5, scale=3).requires_grad_()
    grad = _bf16(4, 33, 96, seed=6)
    out = FusedGeluTanh.apply(x)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    ref = x64 * torch.sigmoid(2 * 0.7978845608028654 * (x64 + 0.044715 * x64**3))
    torch.testing.assert_close(ref, F.gelu(x64, approximate="tanh"), rtol=1e-12, atol=1e-14)
    ref.backward(grad.double())
    _assert_rounded_once("out", out, ref)
    _assert_rounded_once("d x", x.grad, x64.grad)
    x_torch = x.detach().clone().requires_grad_()
    torch_out = F.gelu(x_torch, approximate="tanh")
    torch_out.backward(grad)
    for ours, theirs in ((out, torch_out), (x.grad, x_torch.grad)):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=ROUNDING, atol=1e-4)


def test_plain_mlp_takes_the_gelu_kernel_for_gelu_tanh_in_bf16_only():
    for act, fused in (("gelu_tanh", True), ("gelu", False), ("relu", False)):
        mlp = lmforge.nn.mlp.make_mlp(32, lmforge.config.MLPConfig(d_ff=64, activation=act, gated=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mlp(torch.randn(2, 3, 32))
        assert ("FusedGeluTanhBackward" in _graph_nodes(y)) == fused, act
        assert "FusedGeluTanhBackward" not in _graph_nodes(mlp(torch.randn(2, 3, 32)))


@pytest.mark.parametrize("per_batch_positions", [False, True], ids=["shared-positions", "per-row-positions"])
@pytest.mark.parametrize("T", [1, 19])
def test_rope_heads_match_the_reference_in_float64(T, per_batch_positions):
    """rope_heads = apply_rope_reference then the split into heads-first q and k (GQA: 4 query, 2 key heads),
    forward and backward, each value rounded once from float64; q and k come out contiguous."""
    B, H, K, D = 3, 4, 2, 64
    cfg = lmforge.ModelConfig.from_preset("debug-llama", d_model=H * D, attention={"n_head": H, "n_kv_head": K})
    positions = (torch.randint(0, 500, (B, T)) if per_batch_positions else torch.arange(7, 7 + T)[None])
    cos, sin = RotaryPositions(cfg, bidirectional=False).rotary(positions)  # (B|1, 1, T, D) fp32
    proj = _bf16(B, T, H + 2 * K, D, seed=7, scale=2)  # q, k and v heads of a fused projection
    qk = proj.requires_grad_()
    q, k = rope_heads(proj[:, :, : H + K], cos, sin, H)
    assert q.shape == (B, H, T, D) and k.shape == (B, K, T, D) and q.is_contiguous() and k.is_contiguous()
    grad_q, grad_k = _bf16(B, H, T, D, seed=8), _bf16(B, K, T, D, seed=9)
    torch.autograd.backward((q, k), (grad_q, grad_k))
    x64 = proj.detach().double().requires_grad_()
    rotated = apply_rope_reference(x64[:, :, : H + K], cos.double().transpose(1, 2), sin.double().transpose(1, 2))
    q64, k64 = (t.transpose(1, 2) for t in rotated.split([H, K], dim=2))
    torch.autograd.backward((q64, k64), (grad_q.double(), grad_k.double()))
    _assert_rounded_once("q", q, q64)
    _assert_rounded_once("k", k, k64)
    _assert_rounded_once("d qk", qk.grad[:, :, : H + K], x64.grad[:, :, : H + K])
    assert (qk.grad[:, :, H + K:] == 0).all(), "the value heads get no gradient from the rotation"


def test_attention_takes_the_rope_kernel_in_bf16_only():
    cfg = lmforge.ModelConfig.from_preset("debug-llama")
    model = lmforge.build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "FusedRopeBackward" in _graph_nodes(model(ids).logits)
    assert "FusedRopeBackward" not in _graph_nodes(model(ids).logits)


def test_the_kernels_refuse_tensors_they_would_misread():
    kernels = cpu_kernels()
    with pytest.raises(ValueError, match="need contiguous CPU torch.bfloat16 tensors, got torch.float32"):
        kernels.swiglu_fwd(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="need tensors of one shape"):
        kernels.swiglu_fwd(_bf16(4, 8), _bf16(4, 4))
    with pytest.raises(ValueError, match=r"weight has shape \(8,\), the kernel needs \(16,\)"):
        kernels.rms_norm_fwd(torch.randn(3, 16), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="strides"):
        kernels.gelu_tanh_fwd(_bf16(8, 4).t())
    with pytest.raises(ValueError, match="MAX_SOFTMAX_COLS"):
        kernels.attn_softmax_(_bf16(1, 1, 1, 8193), 1.0, False)
    with pytest.raises(ValueError, match="torch.int64"):
        kernels.cross_entropy_fwd(_bf16(2, 10), torch.tensor([1, 2], dtype=torch.int32), False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):  # -100: an ignore_index not mapped
        kernels.cross_entropy_fwd(_bf16(2, 10), torch.tensor([1, -100]), False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        kernels.cross_entropy_bwd(_bf16(2, 10), torch.tensor([10, 2]), *torch.zeros(4, 2))
