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


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), labels (B, T) aligned with them (already shifted for causal LM).

    Returns (sum of per-token losses in fp32, number of counted tokens), labels equal to ignore_index
    not counted. Label smoothing (Szegedy et al. 2016 §7; Vaswani et al. 2017 §5.4) mixes the one-hot
    target with the uniform distribution over the V classes:
        loss = (1 - eps) * -log p_y + eps * mean_c(-log p_c)
    which is what `F.cross_entropy(label_smoothing=eps)` computes.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1): got {label_smoothing}; 0.1 is the Transformer's")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                         "logits must be labels' shape plus a vocabulary dimension")
    # softmax and loss in fp32 (precision policy); cast before flattening, so that logits sliced from a padded
    # vocabulary (not viewable as 2-D) are copied once, by the cast, instead of twice
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction="sum")
    return loss_sum, (flat_labels != ignore_index).sum()


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
