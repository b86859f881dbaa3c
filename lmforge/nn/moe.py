"""Sparse mixture of experts (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral 2024).

Each token's router softmax picks its top-k experts; the output is the gate-weighted sum of those
experts' FFNs: y = sum_{e in topk(x)} g_e(x) * FFN_e(x)  (Shazeer et al. eq. 1).
Dispatch is dropless: no capacity factor, every routed token is computed.

Shapes: N tokens (B*T flattened), E experts, k chosen per token, D model dim, F expert hidden dim.
Expert weights are stacked (E, F, D) so checkpoints map to HF's per-expert tensors by stacking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import MLPConfig, MoEConfig
from lmforge.nn.mlp import activation


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e, where f_e is
    the fraction of tokens routed to expert e (counting each of the k slots, as HF's Mixtral does)
    and P_e the mean router probability of e. Equals 1 * k for perfectly uniform routing."""
    routed = F.one_hot(chosen, n_experts).float()  # (N, k, E)
    fraction = routed.mean(dim=0)  # (k, E)
    mean_prob = probs.mean(dim=0)  # (E,)
    return n_experts * (fraction * mean_prob[None]).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoE(nn.Module):
    # the experts' matmul; nn.packed.use_onednn_linears points it at onednn_linear (same math)
    linear = staticmethod(F.linear)

    def __init__(self, d_model: int, mlp: MLPConfig, cfg: MoEConfig) -> None:
        super().__init__()
        E, Fdim = cfg.n_experts, mlp.d_ff
        self.cfg = cfg
        self.act = activation(mlp.activation)
        self.gated = mlp.gated
        self.router = nn.Linear(d_model, E, bias=False)
        self.w_up = nn.Parameter(torch.empty(E, Fdim, d_model))
        self.w_gate = nn.Parameter(torch.empty(E, Fdim, d_model)) if mlp.gated else None
        self.w_down = nn.Parameter(torch.empty(E, d_model, Fdim))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """FFN of expert e on x (n, D)."""
        h = self.linear(x, self.w_up[e])
        if self.gated:
            h = self.act(self.linear(x, self.w_gate[e])) * h
        else:
            h = self.act(h)
        return self.linear(h, self.w_down[e])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> router logits (N, E), probs (N, E), top-k weights (N, k), top-k experts (N, k)."""
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights.to(x.dtype), chosen

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Fast path: sort (token, slot) pairs by expert, run each expert once on its contiguous
        slice of routed tokens, scatter-add the weighted outputs back."""
        k = chosen.shape[1]
        flat = chosen.reshape(-1)  # (N*k,)
        order = torch.argsort(flat, stable=True)
        token = order // k  # which token each sorted pair came from
        counts = torch.bincount(flat, minlength=self.w_up.shape[0]).tolist()
        pieces = [self.expert(e, part) for e, part in enumerate(x[token].split(counts)) if counts[e]]
        if not pieces:  # no tokens at all
            return torch.zeros_like(x)
        out = torch.cat(pieces) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, out)

    def dispatch_reference(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Oracle: a readable loop over experts that runs every expert on every token and keeps the
        gate weight of the tokens that chose it (zero elsewhere)."""
        y = torch.zeros_like(x)
        for e in range(self.w_up.shape[0]):
            gate = (weights * (chosen == e)).sum(dim=-1, keepdim=True)  # (N, 1)
            y = y + gate * self.expert(e, x)
        return y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, T, D) -> (y (B, T, D), auxiliary losses already weighted by their coefficients)."""
        flat = x.reshape(-1, x.shape[-1])
        logits, probs, weights, chosen = self.route(flat)
        y = self.dispatch(flat, weights, chosen).view_as(x)
        aux = {
            "moe_load_balance": self.cfg.aux_loss_coef * load_balancing_loss(probs, chosen, probs.shape[-1]),
            "moe_router_z": self.cfg.z_loss_coef * router_z_loss(logits),
        }
        return y, aux
