"""Mixture of Experts feed-forward (the Qwen3-MoE layout): a softmax router picks k of E SwiGLU experts per token.

Tokens are grouped by expert (one stable sort of the token-expert pairs) and each expert runs once, as two
matrix products over all of its tokens; the outputs are weighted by the router's probabilities and added back
with one index_add. No Python loop runs over tokens, only over the E experts. The router runs in float32
whatever the autocast dtype, as does the load-balancing loss.

Shapes: N tokens (batch x time flattened), C hidden size, E experts, K experts per token, F expert width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.model.config import LMConfig


class RouterStats(NamedTuple):
    """One sparse layer's routing, for the load-balancing loss and the per-expert load metric."""

    logits_NE: torch.Tensor
    """Router logits in float32."""
    chosen_NK: torch.Tensor
    """The experts each token was sent to."""
    counts_E: torch.Tensor
    """How many of the N x K routing slots each expert got."""


class MoE(nn.Module):
    """softmax(router(x)) -> top-k experts per token -> sum of prob x SwiGLU_e(x)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        E, C, width = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.top_k, self.norm_topk_prob = E, config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(C, E, bias=False)  # the router (Qwen3-MoE's name)
        # Each expert's gate|up rows and its down matrix, stacked over experts (hf.py splits them per expert).
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * width, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, width))
        self.last_stats: RouterStats | None = None

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Route each token to its top-k experts and mix their outputs."""
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(-1, C)
        logits_NE = F.linear(x_NC.float(), self.gate.weight.float())
        probs_NE = logits_NE.softmax(dim=-1)
        weights_NK, chosen_NK = probs_NE.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        counts_E = torch.bincount(chosen_NK.reshape(-1), minlength=self.num_experts)
        self.last_stats = RouterStats(logits_NE, chosen_NK, counts_E)

        # Group the N*K (token, expert) pairs by expert; a stable sort keeps each expert's tokens in order.
        order_P = chosen_NK.reshape(-1).argsort(stable=True)
        token_P = order_P // self.top_k
        counts = counts_E.tolist()  # one host sync
        x_PC = x_NC[token_P]
        out_PC = torch.empty(x_PC.shape, dtype=x_NC.dtype, device=x_NC.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                gate_PF, up_PF = F.linear(x_PC[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
                out_PC[rows] = F.linear(F.silu(gate_PF) * up_PF, self.down_proj[e]).to(out_PC.dtype)
            start += n
        weight_P = weights_NK.reshape(-1)[order_P].to(out_PC.dtype)
        y_NC = torch.zeros_like(x_NC).index_add_(0, token_P, out_PC * weight_P[:, None])
        return y_NC.reshape(B, T, C)


def load_balancing_loss(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers computes it for Qwen3-MoE: E x sum_e f_e x P_e, where
    f_e is the share of top-k slots routed to e and P_e the mean router probability of e, both pooled over the
    layers (not averaged per layer)."""
    counts_E = pooled_counts(stats)
    probs_E = sum(s.logits_NE.softmax(dim=-1).sum(dim=0) for s in stats)
    rows = sum(s.logits_NE.shape[0] for s in stats)
    return num_experts * torch.sum((counts_E / rows) * (probs_E / rows))


def router_z_loss(stats: list[RouterStats]) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens and layers of logsumexp(router logits)^2."""
    return torch.cat([torch.logsumexp(s.logits_NE, dim=-1) ** 2 for s in stats]).mean()


def pooled_counts(stats: list[RouterStats]) -> torch.Tensor:
    """Routing slots each expert got, summed over the layers: [E], float32."""
    return sum(s.counts_E.float() for s in stats)


def expert_load(stats: list[RouterStats]) -> torch.Tensor:
    """Fraction of the top-k slots each expert received, pooled over the layers: [E], sums to 1."""
    counts_E = pooled_counts(stats)
    return counts_E / counts_E.sum()
