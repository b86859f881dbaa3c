"""oneDNN-packed Linear layers equal F.linear (up to float reassociation), and a packed model gives the same
logits, greedy tokens and state_dict as the plain one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmforge
from lmforge.nn.packed import PackedLinear, pack_for_cpu, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear packing")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 7, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear(dtype, tol, shape, bias):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    packed = PackedLinear(linear)
    expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    got = packed(x)
    assert got.dtype == dtype and got.shape == expected.shape
    rel = ((got.float() - expected).norm() / expected.norm()).item()
    assert rel < tol, f"relative error {rel:.2e} (bound {tol})"
    torch.testing.assert_close(packed.reference(x).float(), F.linear(x, linear.weight, linear.bias).float())
    assert torch.equal(packed.dense_weight(), linear.weight.detach())


@pytest.mark.parametrize("name", ["debug-llama", "debug-gpt2", "debug-mixtral", "debug-t5"])
def test_packed_model_same_logits_tokens_and_state(make_model, make_ids, name):
    model = make_model(name).eval()
    packed = pack_for_cpu(copy.deepcopy(model))
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(type(m) is nn.Linear for m in packed.modules())
    ids = make_ids(2, 8)
    with torch.no_grad():
        args = (ids, ids) if name == "debug-t5" else (ids,)
        expected, got = model(*args).logits, packed(*args).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(lmforge.generate(packed, ids, max_new_tokens=12, temperature=0.0),
                       lmforge.generate(model, ids, max_new_tokens=12, temperature=0.0))
    state, packed_state = model.state_dict(), packed.state_dict()
    assert state.keys() == packed_state.keys()
    assert all(torch.equal(state[k], packed_state[k]) for k in state)
    again = copy.deepcopy(packed)  # an opaque oneDNN tensor has no storage to copy: rebuilt from the weight
    with torch.no_grad():
        assert torch.equal(again(*args).logits, got)


def test_packing_skips_what_it_cannot_pack():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).half())
    pack_for_cpu(model)
    assert isinstance(model[0], PackedLinear) and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match="fp32 or bf16"):
        PackedLinear(nn.Linear(4, 4).half())
