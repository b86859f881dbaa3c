"""oneDNN training GEMMs (`onednn_linear`, `use_onednn_linears`) against `F.linear`, the oracle.

Tolerances: fp32 forward and gradients within 1e-5 relative (max-abs error over max-abs value; the GEMMs
differ from MKL's by summation order only, measured ~1e-6); under bf16 autocast within 2e-2 (bf16 keeps
8 bits of mantissa, and a weight gradient summed over many rows is rounded once to bf16 by either path);
a few AdamW steps of a tiny model: losses within 1e-4 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmforge
from lmforge.nn.packed import OneDNNLinear, onednn_linear, packing_available, use_onednn_linears

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN ops")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _grads(fn, x, weight, bias, autocast: bool):
    """Output and the gradients of x, weight, bias for a fixed random upstream gradient."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, weight, bias)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    y.backward(g)
    return [y, x.grad, weight.grad] + ([] if bias is None else [bias.grad])


SHAPES = [((33, 48), 80), ((2, 17, 64), 96), ((3, 4, 5, 32), 24), ((1, 40), 1)]


@pytest.mark.parametrize("x_shape,out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_forward_and_gradients_match_f_linear(x_shape, out, bias, autocast):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g)
    weight = torch.randn(out, x_shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    ours = _grads(onednn_linear, x, weight, b, autocast)
    ref = _grads(F.linear, x, weight, b, autocast)
    tol = 2e-2 if autocast else 1e-5
    names = ["output", "grad x", "grad weight", "grad bias"][: len(ref)]
    for name, a, r in zip(names, ours, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, f"{name}: {a.shape} {a.dtype} vs {r.shape} {r.dtype}"
        assert rel(a, r) < tol, f"{name} differs from F.linear by {rel(a, r):.2e} (tolerance {tol})"
    if autocast:  # gradients come back in the parameters' dtype, the output in the autocast dtype
        assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == torch.float32


def test_non_contiguous_input_and_frozen_weight():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 32, 5, generator=g).transpose(1, 2)  # (6, 5, 32), strided
    weight = torch.randn(16, 32, generator=g)
    xr = x.clone().requires_grad_()
    y = onednn_linear(xr, weight)  # weight needs no gradient: only dx is computed
    y.sum().backward()
    x2 = x.clone().requires_grad_()
    F.linear(x2, weight).sum().backward()
    assert not x.is_contiguous()
    assert rel(y, F.linear(x, weight)) < 1e-5 and rel(xr.grad, x2.grad) < 1e-5


def test_bad_inputs_raise():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="one dtype"):
        onednn_linear(x, torch.randn(3, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bias"):
        onednn_linear(x, torch.randn(3, 8), torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="CPU"):
        use_onednn_linears(nn.Linear(8, 3, device="meta"))


def test_swap_keeps_parameters_and_state_dict():
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-gpt2", tie_embeddings=False), seed=0)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    use_onednn_linears(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert type(model.head.proj) is OneDNNLinear  # the untied LM head too
    assert dict(model.named_parameters()) == params  # same Parameter objects, same names
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)  # checkpoints and DDP deep-copy / pickle modules: the class must survive
    assert type(clone.head.proj) is OneDNNLinear


def _losses(model: nn.Module, ids: torch.Tensor, steps: int, autocast: bool) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset", ["debug-llama", "debug-gpt2"])
def test_training_steps_match(preset):
    """A few AdamW steps with and without the swap: the same losses up to float reassociation."""
    cfg = lmforge.ModelConfig.from_preset(preset, tie_embeddings=False, dropout=0.0)
    model = lmforge.build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    fast = use_onednn_linears(copy.deepcopy(model))
    ref, ours = _losses(model, ids, 5, False), _losses(fast, ids, 5, False)
    assert ref[-1] < ref[0], "the reference run should learn something, or the comparison proves little"
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: oneDNN loss {a} vs F.linear {b}"


def test_recipe_option_is_validated():
    from lmforge.train.recipe import recipe_from_dict

    assert recipe_from_dict({}).train.matmul == "aten"  # the default keeps the golden loss curve exact
    assert recipe_from_dict({}, ["train.matmul=onednn"]).train.matmul == "onednn"
    with pytest.raises(ValueError, match="train.matmul='mkl'.*aten"):
        recipe_from_dict({"train": {"matmul": "mkl"}})


@pytest.mark.slow
def test_debug_recipe_with_onednn_follows_the_golden_curve(tmp_path):
    """The whole loop with train.matmul=onednn: its 16 losses are the golden (aten) ones to 1e-4 relative."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    golden = json.loads((root / "tests" / "assets" / "golden_debug_losses.json").read_text())
    cmd = [sys.executable, "-m", "lmforge", "train", str(root / golden["recipe"]), "--out", str(tmp_path),
           *golden["overrides"], "--train.matmul=onednn"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    if json.loads((tmp_path / "run.json").read_text())["tokenizer_fingerprint"] != golden["tokenizer_fingerprint"]:
        pytest.skip("the python-code corpus differs on this machine, so the golden curve does not apply")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == len(golden["loss"])
    for step, (a, b) in enumerate(zip(losses, golden["loss"], strict=True), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: loss {a} with oneDNN vs golden {b}"
