"""Norms and feed-forward networks against their formulas and Hugging Face transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import MLPConfig, NormConfig
from lmforge.nn.mlp import ACTIVATIONS, MLP, GatedMLP, activation, make_mlp
from lmforge.nn.norms import NORMS, RMSNorm, make_norm, rms_norm_reference

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

D = 48


def _rms_pair(eps: float = 1e-5) -> tuple[RMSNorm, LlamaRMSNorm]:
    ours = make_norm(D, NormConfig(kind="rms", eps=eps))
    assert isinstance(ours, RMSNorm)
    theirs = LlamaRMSNorm(D, eps=eps)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(D) * 0.5 + 1.0)
        theirs.weight.copy_(ours.weight)
    return ours, theirs


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 0.1])
def test_rms_norm_matches_llama_and_torch(eps):
    ours, theirs = _rms_pair(eps)
    x = torch.randn(3, 5, D) * 3
    y = ours(x)
    diff_hf = (y - theirs(x)).abs().max().item()
    diff_torch = (y - F.rms_norm(x, (D,), ours.weight, eps)).abs().max().item()
    assert diff_hf < 1e-6, f"RMSNorm differs from LlamaRMSNorm by {diff_hf:.2e}"
    assert diff_torch < 1e-5, f"RMSNorm differs from torch.nn.functional.rms_norm by {diff_torch:.2e}"
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ours.weight
    assert (y - expected).abs().max() < 1e-5, "RMSNorm must be x / sqrt(mean(x^2) + eps) * g (no mean subtraction)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_keeps_the_input_dtype(dtype):
    """With weights in the compute dtype (a model cast with .to(dtype)), the output keeps it, and equals
    Llama's norm, which also normalises in fp32 and casts back before the gain."""
    ours, theirs = _rms_pair()
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (torch.randn(4, D) * 3).to(dtype)
    y = ours(x)
    assert y.dtype == dtype, f"RMSNorm turned {dtype} input into {y.dtype}"
    assert torch.equal(y, theirs(x)), f"RMSNorm ({dtype}) differs from LlamaRMSNorm"


def test_rms_norm_with_fp32_weight_promotes_like_llama():
    """fp32 gain times bf16 activations gives fp32, exactly as LlamaRMSNorm (HF parity relies on this)."""
    ours, theirs = _rms_pair()
    x = torch.randn(4, D).to(torch.bfloat16)
    assert ours(x).dtype == theirs(x).dtype == torch.float32
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32,) * 2, (torch.bfloat16, torch.float32),
                                             (torch.bfloat16,) * 2, (torch.float16,) * 2], ids=str)
@pytest.mark.parametrize("placement", ["alone", "residual"])
def test_rms_norm_backward_is_bitwise_the_reference(x_dtype, w_dtype, placement):
    """RMSNorm (one autograd node) == rms_norm_reference (the ops written out): output, input and weight
    gradients bit for bit, also as a pre-norm residual branch x + norm(x) W, where x's gradient is the sum of
    three terms whose order of addition must match the reference's graph."""
    norm = RMSNorm(D, eps=1e-6).to(w_dtype)
    proj = nn.Linear(D, D, bias=False).to(x_dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    x0 = (torch.randn(2, 9, D, generator=g) * 3).to(x_dtype)
    results = []
    for forward in (lambda x: rms_norm_reference(x, norm.weight, norm.eps), norm):
        norm.weight.grad = None
        x = x0.clone().requires_grad_(True)
        y = forward(x) if placement == "alone" else x + proj(forward(x).to(x_dtype))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        results.append((y.detach(), x.grad, norm.weight.grad))
    for name, ours, ref in zip(("output", "input grad", "weight grad"), results[1], results[0]):
        assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != reference {ref.dtype}"
        diff = (ours.float() - ref.float()).abs().max().item()
        assert torch.equal(ours, ref), f"{name} differs from rms_norm_reference by up to {diff:.3e}"


def test_rms_norm_grads_only_where_asked():
    norm = RMSNorm(D)
    x = torch.randn(3, D, requires_grad=True)
    norm.weight.requires_grad_(False)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    norm.weight.requires_grad_(True)
    norm(torch.randn(3, D)).sum().backward()
    assert norm.weight.grad is not None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_norm_via_make_norm(bias):
    norm = make_norm(D, NormConfig(kind="layer", eps=1e-5, bias=bias))
    assert isinstance(norm, nn.LayerNorm)
    assert (norm.bias is not None) == bias, f"NormConfig.bias={bias} but LayerNorm.bias is {norm.bias}"
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D))
        if bias:
            norm.bias.copy_(torch.randn(D))
    x = torch.randn(2, 7, D) * 2 + 1
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + (norm.bias if bias else 0)
    diff = (norm(x) - expected).abs().max().item()
    assert diff < 1e-5, f"LayerNorm (bias={bias}) differs from (x - mean) / sqrt(var + eps) * g + b by {diff:.2e}"


# -- MLPs -------------------------------------------------------------------------------------------------------

FORMULAS = {
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
}


def test_every_activation_has_a_formula_here():
    assert set(FORMULAS) == set(ACTIVATIONS), f"untested activations: {set(ACTIVATIONS) ^ set(FORMULAS)}"


@pytest.mark.parametrize("name", list(FORMULAS))
def test_activation_matches_formula(name):
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    diff = (activation(name)(x) - FORMULAS[name](x)).abs().max().item()
    assert diff < 1e-12, f"{name} differs from its formula by {diff:.2e}"
    assert not torch.allclose(activation("gelu")(x), activation("gelu_tanh")(x), atol=1e-6), \
        "gelu (erf) and gelu_tanh must be different functions"


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("name", list(FORMULAS))
def test_mlp_matches_formula(name, gated, bias):
    torch.manual_seed(0)
    mlp = make_mlp(D, MLPConfig(d_ff=80, activation=name, gated=gated, bias=bias))
    assert isinstance(mlp, GatedMLP if gated else MLP), f"gated={gated} built {type(mlp).__name__}"
    if bias:
        with torch.no_grad():
            for m in mlp.modules():
                if isinstance(m, nn.Linear):
                    m.bias.normal_()
    act = FORMULAS[name]
    x = torch.randn(2, 5, D)
    if gated:  # down(act(gate(x)) * up(x))  (Shazeer 2020, eq. 6)
        expected = _linear(act(_linear(x, mlp.gate)) * _linear(x, mlp.up), mlp.down)
    else:  # down(act(up(x)))  (Vaswani et al. 2017, eq. 2)
        expected = _linear(act(_linear(x, mlp.up)), mlp.down)
    diff = (mlp(x) - expected).abs().max().item()
    assert diff < 1e-5, f"{'gated' if gated else 'plain'} MLP with {name} differs from its formula by {diff:.2e}"



@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gated_mlp_casts_its_input_once_with_the_same_numbers(autocast, monkeypatch):
    """Under autocast GatedMLP casts x once for gate and up; the output and every gradient must equal the
    plain formula, where autocast casts x for each projection. (With the fused SwiGLU kernel the numbers
    change within bf16 rounding: tests/nn/test_cpu_kernels.py; here the torch ops.)"""
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    torch.manual_seed(0)
    mlp = make_mlp(D, MLPConfig(d_ff=80, activation="silu", gated=True))
    results = []
    for forward in (lambda x: mlp.down(F.silu(mlp.gate(x)) * mlp.up(x)), mlp):
        x = (torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.float().square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad.clone() for p in mlp.parameters()])
        mlp.zero_grad(set_to_none=True)
    for name, a, b in zip(["output", "x.grad"] + [n for n, _ in mlp.named_parameters()], *results):
        assert torch.equal(a, b), f"{name} differs from the two-cast formula by {(a - b).abs().max().item():.2e}"


# -- registries fail with the list of valid keys ------------------------------------------------------------


def test_make_norm_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"'batch'.*\['layer', 'rms'\]"):
        make_norm(D, NormConfig(kind="batch"))
    assert set(NORMS) == {"layer", "rms"}


def test_unknown_activation_lists_valid_names():
    valid = r"\['gelu', 'gelu_tanh', 'relu', 'silu'\]"
    with pytest.raises(ValueError, match=rf"'swish'.*{valid}"):
        activation("swish")
    for gated in (True, False):
        with pytest.raises(ValueError, match=rf"'swish'.*{valid}"):
            make_mlp(D, MLPConfig(d_ff=8, activation="swish", gated=gated))
