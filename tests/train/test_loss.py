"""Token loss (sum, count), label smoothing, auxiliary losses, accumulation equals one big batch, and the
chunked cross-entropy equals F.cross_entropy bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmforge
import lmforge.train.loss as loss_module
from lmforge.models.output import ModelOutput
from lmforge.train.loss import loss_with_aux, token_loss, token_loss_reference


def random_batch(seed: int = 0, B: int = 3, T: int = 5, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return logits, labels


def test_sum_and_count_match_cross_entropy_mean():
    logits, labels = random_batch()
    loss_sum, n = token_loss(logits, labels)
    assert n.item() == 12
    mean = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    torch.testing.assert_close(loss_sum / n, mean)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_matches_torch_and_the_formula(eps):
    logits, labels = random_batch(1)
    loss_sum, n = token_loss(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(loss_sum / n, F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1),
                                                             label_smoothing=eps))
    # Szegedy et al. 2016 §7: target q' = (1 - eps) one_hot(y) + eps / V; loss = -sum_c q'_c log p_c.
    logp = logits.log_softmax(-1)
    keep = labels != -100
    target = torch.full_like(logp, eps / 11)
    target[keep] += (1 - eps) * F.one_hot(labels[keep], 11).float()
    by_formula = -(target * logp).sum(-1)[keep].sum()
    torch.testing.assert_close(loss_sum, by_formula)
    assert not torch.allclose(loss_sum, token_loss(logits, labels)[0]), "smoothing must change the loss"


def test_loss_is_fp32_for_bf16_logits():
    logits, labels = random_batch()
    loss_sum, _ = token_loss(logits.bfloat16(), labels)
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum, token_loss(logits.bfloat16().float(), labels)[0])


def test_custom_ignore_index_and_all_ignored():
    logits, labels = random_batch()
    labels[labels == -100] = 0
    _, n = token_loss(logits, labels, ignore_index=0)
    assert n.item() == (labels != 0).sum().item()
    loss_sum, n = token_loss(logits, torch.full_like(labels, -100))
    assert loss_sum.item() == 0.0 and n.item() == 0


def _loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_(True)
    loss_sum, _ = fn(leaf, labels, **kw)
    loss_sum.backward(torch.tensor(0.731))  # a gradient other than 1, as a divided loss gives
    return loss_sum.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "ignore_index=0"])
def test_chunked_cross_entropy_is_bitwise_the_reference(dtype, eps, layout, monkeypatch):
    """token_loss (chunked) == token_loss_reference (F.cross_entropy on logits.float()): loss and gradient
    bit for bit, with several chunks and a short last one, ignored tokens and an all-ignored row. (bf16 on
    the CPU takes the fused kernel when it is built: tests/nn/test_cpu_kernels.py; here the torch path.)"""
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    monkeypatch.setattr(loss_module, "CHUNK_VALUES", 4 * 100)  # 8 rows (MIN_CHUNK_ROWS) per chunk: 3 chunks
    g = torch.Generator().manual_seed(0)
    padded = torch.randn(3, 7, 112, generator=g) * 4
    logits = (padded[..., :100] if layout == "sliced" else padded[..., :100].contiguous()).to(dtype)
    labels = torch.randint(0, 100, (3, 7), generator=g)
    labels[1] = -100  # an all-ignored sequence
    labels[0, ::3] = -100
    kw = {"label_smoothing": eps}
    if layout == "ignore_index=0":
        labels, kw["ignore_index"] = labels.clamp(min=0), 0
    ours, ours_grad = _loss_and_grad(token_loss, logits, labels, **kw)
    ref, ref_grad = _loss_and_grad(token_loss_reference, logits, labels, **kw)
    assert ours.dtype == torch.float32 and ours_grad.dtype == dtype
    assert torch.equal(ours, ref), f"loss {ours.item()!r} != F.cross_entropy's {ref.item()!r}"
    diff = (ours_grad.float() - ref_grad.float()).abs().max().item()
    assert torch.equal(ours_grad, ref_grad), f"gradient differs from F.cross_entropy's by up to {diff:.3e}"
    assert ours_grad[1].abs().sum() == 0, "ignored tokens must get no gradient"


@pytest.mark.parametrize("kernels", ["0", "1"], ids=["torch-ops", "fused-kernel"])
def test_chunked_cross_entropy_with_default_chunks_and_a_big_vocabulary(kernels, monkeypatch):
    """At the default chunk size (CHUNK_VALUES / V rows; here 32 rows of V = 8192, 3 chunks for 70 rows), and
    through the fused bf16 kernel (where it is built): both against the math in fp64."""
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", kernels)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 35, 8192, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 8192, (2, 35), generator=g)
    labels[0, :5] = -100
    ours, ours_grad = _loss_and_grad(token_loss, logits, labels)
    if kernels == "0":
        ref, ref_grad = _loss_and_grad(token_loss_reference, logits, labels)
        assert torch.equal(ours, ref) and torch.equal(ours_grad, ref_grad)
    # and the math, in fp64: sum_i lse(z_i) - z_i[y_i]; gradient g (softmax(z) - onehot(y)), rounded to bf16
    z, keep = logits.double().reshape(-1, 8192), labels.reshape(-1) != -100
    y = labels.reshape(-1)[keep]
    exact = (z[keep].logsumexp(-1) - z[keep].gather(1, y[:, None])[:, 0]).sum()
    assert abs(ours.item() - exact.item()) < 1e-6 * exact.item(), f"{ours.item()} vs exact {exact.item()}"
    grad = torch.zeros_like(z)
    grad[keep] = 0.731 * (z[keep].softmax(-1) - F.one_hot(y, 8192).double())
    torch.testing.assert_close(ours_grad.reshape(-1, 8192).double(), grad, rtol=2**-8, atol=1e-6)


def test_token_loss_without_grad_and_out_of_range_labels():
    logits, labels = random_batch()
    with torch.no_grad():
        assert torch.equal(token_loss(logits, labels)[0], token_loss_reference(logits, labels)[0])
    labels[1, 1] = 11
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        token_loss(logits, labels)
    labels[1, 1] = -5
    with pytest.raises(ValueError, match="or equal ignore_index=-100"):
        token_loss(logits, labels)


def test_bad_inputs_raise():
    logits, labels = random_batch()
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\)"):
        token_loss(logits, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="disagree"):
        token_loss(logits, labels[:, :-1])


def test_loss_with_aux_adds_the_weighted_aux_losses():
    logits, labels = random_batch()
    aux = {"moe_load_balance": torch.tensor(0.25), "moe_router_z": torch.tensor(0.5)}
    parts = loss_with_aux(ModelOutput(logits=logits, aux_losses=aux), labels)
    loss_sum, n = token_loss(logits, labels)
    torch.testing.assert_close(parts.objective, loss_sum / n + 0.75)
    assert parts.aux.item() == pytest.approx(0.75) and parts.n_tokens.item() == 12
    scaled = loss_with_aux(ModelOutput(logits=logits, aux_losses=aux), labels, normalizer=100, aux_scale=0.5)
    torch.testing.assert_close(scaled.objective, loss_sum / 100 + 0.375)
    plain = loss_with_aux(ModelOutput(logits=logits), labels)
    torch.testing.assert_close(plain.objective, loss_sum / n)
    empty = loss_with_aux(ModelOutput(logits=logits), torch.full_like(labels, -100))
    assert empty.objective.item() == 0.0, "an all-ignored micro-batch contributes 0, not nan"


def test_loss_with_aux_backpropagates_through_moe_aux_losses():
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-mixtral"), seed=0)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    parts = loss_with_aux(out, ids)
    assert parts.aux.item() > 0
    parts.objective.backward()
    router = model.blocks[0].mlp.router.weight.grad
    assert router is not None and router.abs().sum() > 0


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_equals_one_big_batch():
    """K micro-batches, each loss_sum / global_tokens, accumulated == one big batch (fp32, 1e-6)."""
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-llama"), seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 16), generator=g)
    labels = torch.randint(0, 256, (4, 16), generator=g)
    labels[0, 3:] = -100  # micro-batches with very different token counts: 3, 16, 16, 9
    labels[3, :7] = -100

    loss_sum, n = token_loss(model(ids).logits, labels)
    (loss_sum / n).backward()
    big = grads(model)

    model.zero_grad()
    global_tokens = (labels != -100).sum()
    for i in range(4):
        micro_sum, _ = token_loss(model(ids[i : i + 1]).logits, labels[i : i + 1])
        (micro_sum / global_tokens).backward()
    accumulated = grads(model)
    for (name, _), a, b in zip(model.named_parameters(), accumulated, big):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

    model.zero_grad()  # the wrong way: the mean of per-micro-batch means
    for i in range(4):
        micro_sum, micro_n = token_loss(model(ids[i : i + 1]).logits, labels[i : i + 1])
        (micro_sum / micro_n / 4).backward()
    worst = max((a - b).abs().max().item() for a, b in zip(grads(model), big))
    assert worst > 1e-4, "mean of means should differ when token counts differ (else this test shows nothing)"
