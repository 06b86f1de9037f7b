"""SwiGLU feed-forward network: the per-token MLP of every block.

    FFN(x) = down( silu(gate(x)) * up(x) )

A gated linear unit: `up(x)` carries the content, `silu(gate(x))` decides per feature how
much passes. Three bias-free matrices of width `intermediate_size` (1408 for hidden 512,
8/3 * hidden rounded up to 64, see `config.ffn_hidden_size`) cost the same as a 4x MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, shared_input_linear


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, T, D) -> (B, T, F) -> (B, T, D)
        gate, up = shared_input_linear(x, self.gate_proj, self.up_proj)    # (B, T, F) each
        return self.dropout(self.down_proj(F.silu(gate) * up))
