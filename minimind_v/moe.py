"""Mixture of experts: a feed-forward layer of several SwiGLUs, each token sent to the best k.

Where it sits: in minimind-3v-moe every block's FFN (`lm.Block.ffn`) is this layer instead of one
`ffn.SwiGLU`. Per token x (D,):

    p = softmax(gate(x))                 router probabilities over E experts        (E,)
    w, e = topk(p, k)                    the k best experts and their probabilities (k,)
    w = w / sum(w)                       renormalised when norm_topk_prob (top-1: w = 1)
    y = sum_j w_j * expert_{e_j}(x)                                                  (D,)

So a token pays for k experts, while the model holds E of them: with E = 4, k = 1 minimind-3v-moe
has about 4x the FFN parameters of the dense model at the same compute per token.

Dispatch. Rather than a Python loop over tokens, the N*k (token, expert) pairs are sorted by
expert once; each expert then runs one matmul on its contiguous slice of tokens and the weighted
results are added back to their tokens with `index_add_` (a loop over the E experts, not the N tokens).

Load balancing. Left alone, a router collapses onto a few experts (they get better, so they get
chosen more). The auxiliary loss (Switch Transformer's, as upstream MiniMind computes it per layer)

    aux = coef * E * sum_e f_e * P_e,   f_e = (tokens routed to e) / N,   P_e = mean_tokens p_e

is smallest when both the routing counts f and the mean probabilities P are uniform. f has no
gradient (it counts), P carries it into the router. Upstream computes it in training mode only
(0 in eval) and adds the layers' sum to the loss; `MoEFeedForward.aux_loss` holds the last value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .ffn import SwiGLU
from .linear import Linear


def route(logits: torch.Tensor, k: int, norm_topk_prob: bool = True):
    """Router logits (N, E) -> (probs (N, E) in at least float32, weights (N, k), experts (N, k) long).

    softmax over all experts first, then top-k of the probabilities; with `norm_topk_prob` the k
    weights are divided by their sum (+1e-20, as upstream, so an all-zero row stays finite).
    """
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))   # (N, E)
    weights, experts = probs.topk(k, dim=-1)                        # (N, k), (N, k)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return probs, weights, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e for one layer. probs (N, E), experts (N, k) -> scalar.

    f_e = (number of the N*k choices that picked e) / N, P_e = probs[:, e].mean().
    """
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)   # (E,)
    return num_experts * (counts / probs.shape[0] * probs.mean(dim=0)).sum()


class MoEFeedForward(nn.Module):
    """`num_experts` SwiGLU experts and a bias-free linear router (`gate`), upstream's names:
    `gate.weight` (E, D), `experts.{e}.{gate,up,down}_proj.weight`."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.num_experts, self.k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob, self.aux_coef = cfg.norm_topk_prob, cfg.router_aux_loss_coef
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.dropout)
                                     for _ in range(cfg.num_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, D = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, D)                                             # (N, D)
        probs, weights, experts = route(self.gate(x), self.k, self.norm_topk_prob)   # (N, E), (N, k), (N, k)
        # sort the N*k (token, expert) pairs by expert: expert e's tokens are one contiguous slice
        flat = experts.reshape(-1)                                       # (N*k,)
        order = flat.argsort(stable=True)                                # pair indices, grouped by expert
        tokens = order // self.k                                         # (N*k,) the token of each pair
        pair_w = weights.reshape(-1)[order].to(x.dtype)[:, None]         # (N*k, 1)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        y = torch.zeros_like(x)                                          # (N, D)
        start = 0
        for e, n in enumerate(counts):                                   # a loop over experts only
            if n:
                rows = tokens[start:start + n]                           # (n,)
                y.index_add_(0, rows, self.experts[e](x[rows]) * pair_w[start:start + n])
            start += n
        if self.training and self.aux_coef > 0:
            self.aux_loss = self.aux_coef * load_balancing_loss(probs, experts, self.num_experts)
        else:
            self.aux_loss = probs.new_zeros(())
        return y.reshape(*lead, D)
