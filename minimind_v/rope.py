"""Rotary position embedding (RoPE), in the rotate-half convention of Llama and MiniMind.

Attention scores are dot products q_m . k_n. RoPE rotates each query/key by an angle
proportional to its position, pair of dimensions by pair of dimensions, so that

    rot(q, m) . rot(k, n)  depends only on  q, k and m - n

(rotations compose: R(m)^T R(n) = R(n - m)). Positions thus enter attention only as
relative offsets, no position vectors are added, and norms are preserved.

Pairing: "rotate half" pairs dimension i with i + hd/2 (not 2i with 2i+1 as in the
original paper's complex-number form); both are the same rotation up to a permutation of
dimensions. Frequencies: theta_i = base^(-2i/hd), i = 0 .. hd/2-1, base = rope_theta (1e6).
"""
from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_len: int, theta: float = 1e6,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim); row t holds the angles of position t."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (hd/2,)
    t = torch.arange(max_len, dtype=torch.float64)                                             # (max_len,)
    angles = torch.outer(t, inv_freq)                                                          # (max_len, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                                               # (max_len, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions.

    q (B, T, H, hd), k (B, T, H_kv, hd); cos, sin (T, hd) already sliced to the positions of
    these T tokens (with a KV cache: rows start .. start+T-1). Returns tensors in q/k's dtype.
    """
    cos = cos[None, :, None, :]        # (1, T, 1, hd) broadcast over batch and heads
    sin = sin[None, :, None, :]
    q_out = q * cos + rotate_half(q) * sin
    k_out = k * cos + rotate_half(k) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)
