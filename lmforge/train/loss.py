"""Token-level cross-entropy as (sum, count), and the training objective with MoE auxiliary losses.

Why a sum and a count rather than a mean: with gradient accumulation (and data parallelism) one
optimizer step sees several micro-batches whose numbers of counted tokens differ (padding, masked-LM
masks, ignore_index labels). The big-batch loss is sum_i loss_i / N_global over all N_global tokens.
Averaging per-micro-batch means instead weights a token in a short micro-batch more than one in a long
micro-batch, so the accumulated gradient is not the big-batch gradient. Dividing each micro-batch's
sum by the global count makes the accumulated gradients add up to exactly the big-batch gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lmforge.nn.kernels import cpu_kernels, use_kernel

# Rows of logits per chunk in ChunkedCrossEntropy on CPU: 2^18 fp32 values (1 MiB), so a chunk's fp32
# temporaries stay in L2; at least 8 rows, so a huge vocabulary does not mean thousands of Python-level chunks.
CHUNK_VALUES = 2**18
MIN_CHUNK_ROWS = 8


def _chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    # on accelerators the whole tensor is one chunk: there, many small kernels cost more than the memory
    if device.type != "cpu":
        return max(n_rows, 1)
    return max(CHUNK_VALUES // vocab, MIN_CHUNK_ROWS)


class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), labels, reduction="sum"), forward and backward, bit for bit, without
    N x V fp32 tensors in main memory.

    The reference materialises logits.float() and log_softmax (fp32, N x V), keeps the latter for backward,
    which fills an N x V zero gradient for nll_loss, writes the fp32 input gradient and casts it back to the
    logits' dtype. Here the same aten kernels (log_softmax, nll_loss, _log_softmax_backward_data) run on
    chunks of rows small enough to stay in cache, and the backward writes its gradient straight into the
    logits' dtype. Every kernel is row-wise, and the only sums over rows (nll_loss's, and the smoothing
    term's) run once on the whole (N,) vectors, as in the reference, so the numbers are torch's own;
    tests/train/test_loss.py checks the bitwise identity.

    Chunking rows so that the softmax temporaries stay on chip is the idea of Liger-Kernel's fused (linear)
    cross-entropy (Hsu et al. 2024, arXiv:2410.10989). Unlike Liger, which computes the gradient during the
    forward pass and stores it in the logits' storage, this recomputes each chunk's log_softmax in backward:
    the logits are returned to the caller (ModelOutput) and must stay intact, and no N x V tensor is kept.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, ignore_index: int):
        n_rows, vocab = logits.shape
        keep = labels != ignore_index
        safe_labels = torch.where(keep, labels, 0)[:, None]  # (N, 1): a valid index for ignored rows too
        picked = torch.empty(n_rows, 1, dtype=torch.float32, device=logits.device)  # log p_y per row
        smooth = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if label_smoothing else None
        step = _chunk_rows(n_rows, vocab, logits.device)
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            logp = torch.log_softmax(logits[rows].float(), dim=-1)
            torch.gather(logp, 1, safe_labels[rows], out=picked[rows])
            if smooth is not None:
                torch.sum(logp, dim=-1, out=smooth[rows])
        # nll_loss over the picked column (class 0; -1 marks ignored rows) sums -log p_y over the kept rows in
        # the order it would over the full (N, V) input
        loss = F.nll_loss(picked, torch.where(keep, 0, -1), ignore_index=-1, reduction="sum")
        if smooth is not None:  # as torch's cross_entropy_loss_label_smoothing: sum of -sum_c log p_c per row
            loss = (1 - label_smoothing) * loss + (-smooth).masked_fill_(~keep, 0.0).sum() * (label_smoothing / vocab)
        ctx.save_for_backward(logits, safe_labels, keep)
        ctx.label_smoothing = label_smoothing
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe_labels, keep = ctx.saved_tensors
        eps = ctx.label_smoothing
        n_rows, vocab = logits.shape
        grad_logits = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
        # d loss / d log p, as autograd builds it in the reference: nll_loss's backward puts -g' at the label
        # (g' = g (1 - eps) with smoothing), the smoothing term adds -g eps / V to every class of kept rows
        at_label = torch.where(keep, -(grad_loss * (1 - eps) if eps else grad_loss), 0.0)[:, None]  # (N, 1)
        every_class = torch.where(keep, -(grad_loss * (eps / vocab)), 0.0)[:, None] if eps else None
        step = _chunk_rows(n_rows, vocab, logits.device)
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            logp = torch.log_softmax(logits[rows].float(), dim=-1)
            if every_class is None:
                grad_logp = torch.zeros_like(logp).scatter_(1, safe_labels[rows], at_label[rows])
            else:
                grad_logp = every_class[rows].expand_as(logp).clone().scatter_add_(1, safe_labels[rows],
                                                                                   at_label[rows])
            if grad_logits.dtype == torch.float32:  # straight into the result, no copy
                torch.ops.aten._log_softmax_backward_data.out(grad_logp, logp, -1, torch.float32,
                                                              out=grad_logits[rows])
            else:
                grad_logits[rows] = torch.ops.aten._log_softmax_backward_data(grad_logp, logp, -1, torch.float32)
        return grad_logits, None, None, None


class FusedCrossEntropy(torch.autograd.Function):
    """`ChunkedCrossEntropy` for bf16 logits on the CPU: one pass over the logits forward (the per-row
    log-sum-exp, log p_y and, with smoothing, sum_c log p_c, in fp32) and one backward, where the gradient
    g (p - (1 - eps) onehot(y) - eps / V) of each kept row is computed in fp32 and rounded to bf16 once
    (lmforge/nn/kernels/cpu.c). The same loss as the reference within fp32 rounding (another summation order);
    keeps only the (N,) log-sum-exps besides the logits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, ignore_index: int):
        keep = labels != ignore_index
        safe_labels = torch.where(keep, labels, 0).to(torch.int64).contiguous()  # the kernel reads int64
        logits = logits.contiguous()
        lse, picked, total = cpu_kernels().cross_entropy_fwd(logits, safe_labels, with_sum=label_smoothing > 0)
        loss = -picked.masked_fill(~keep, 0.0).sum()
        if total is not None:
            smooth = (-total).masked_fill_(~keep, 0.0).sum()
            loss = (1 - label_smoothing) * loss + smooth * (label_smoothing / logits.shape[1])
        ctx.save_for_backward(logits, safe_labels, keep, lse)
        ctx.label_smoothing = label_smoothing
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe_labels, keep, lse = ctx.saved_tensors
        eps, vocab = ctx.label_smoothing, logits.shape[1]
        coef_p = torch.where(keep, grad_loss.float(), 0.0)  # (N,): g for kept rows, 0 for ignored ones
        grad = cpu_kernels().cross_entropy_bwd(logits, safe_labels, lse, coef_p, coef_p * (-eps / vocab),
                                               coef_p * -(1 - eps))
        return grad, None, None, None


def _fused_loss_applies(logits: torch.Tensor) -> bool:
    # bf16 only: fp32 and fp16 logits keep ChunkedCrossEntropy, bit for bit F.cross_entropy (the golden curve)
    return logits.device.type == "cpu" and logits.dtype == torch.bfloat16 and use_kernel("cross_entropy")


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), labels (B, T) aligned with them (already shifted for causal LM).

    Returns (sum of per-token losses in fp32, number of counted tokens), labels equal to ignore_index
    not counted. Label smoothing (Szegedy et al. 2016 §7; Vaswani et al. 2017 §5.4) mixes the one-hot
    target with the uniform distribution over the V classes:
        loss = (1 - eps) * -log p_y + eps * mean_c(-log p_c)
    which is what `F.cross_entropy(label_smoothing=eps)` computes; `token_loss_reference` is that call,
    and `ChunkedCrossEntropy` gives its numbers bit for bit with less memory traffic.
    """
    if torch.compiler.is_compiling():  # inductor fuses the reference's ops into its own kernels
        return token_loss_reference(logits, labels, label_smoothing=label_smoothing, ignore_index=ignore_index)
    _check(logits, labels, label_smoothing)
    flat_labels = labels.reshape(-1)
    counted = flat_labels != ignore_index
    # F.cross_entropy checks its labels; the chunked kernel gathers with them, so check here (one sync)
    low, high = torch.stack(torch.aminmax(torch.where(counted, flat_labels, 0))).tolist() if counted.numel() else (0, 0)
    if low < 0 or high >= logits.shape[-1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[-1]}) or equal ignore_index={ignore_index}: got "
                         f"values in [{low}, {high}]; check the tokenizer's vocab_size against the model's")
    # softmax and loss in fp32 (precision policy), computed chunk by chunk from logits in their own dtype
    function = FusedCrossEntropy if _fused_loss_applies(logits) else ChunkedCrossEntropy
    loss_sum = function.apply(logits.reshape(-1, logits.shape[-1]), flat_labels, label_smoothing,
                                         ignore_index)
    return loss_sum, counted.sum()


def token_loss_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_loss` written as one F.cross_entropy call on fp32 logits: the readable oracle of the tests."""
    _check(logits, labels, label_smoothing)
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction="sum")
    return loss_sum, (flat_labels != ignore_index).sum()


def _check(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1): got {label_smoothing}; 0.1 is the Transformer's")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                         "logits must be labels' shape plus a vocabulary dimension")


class LossParts(NamedTuple):
    objective: torch.Tensor  # what to call backward() on
    ce_sum: torch.Tensor  # detached, fp32: summed token cross-entropy, for logging
    n_tokens: torch.Tensor  # counted tokens in this micro-batch
    aux: torch.Tensor  # detached: the sum of the model's weighted auxiliary losses (0 when none)


def loss_with_aux(
    out,
    labels: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
    aux_scale: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> LossParts:
    """The training objective for one micro-batch: ce_sum / normalizer + aux_scale * sum(out.aux_losses).

    out: a model output with `.logits` (B, T, V) and `.aux_losses` (already weighted scalars, e.g. MoE
        load balancing and router z-loss).
    normalizer: the token count of the whole optimizer step (all micro-batches, all ranks); None uses
        this micro-batch's own count, giving the plain mean.
    aux_scale: the auxiliary losses are already per-batch means, so with K accumulated micro-batches
        pass 1 / K to average them over the step.
    """
    ce_sum, n_tokens = token_loss(out.logits, labels, label_smoothing=label_smoothing, ignore_index=ignore_index)
    if normalizer is None:
        normalizer = n_tokens.clamp(min=1)  # an all-ignored micro-batch gives 0, not nan
    aux = sum((v.float() for v in getattr(out, "aux_losses", {}).values()), torch.zeros((), device=ce_sum.device))
    objective = ce_sum / normalizer + aux_scale * aux
    return LossParts(objective, ce_sum.detach(), n_tokens, aux.detach())
