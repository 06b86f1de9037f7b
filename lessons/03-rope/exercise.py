"""Lesson 03 exercises: rotary position embedding, rotate-half convention.

Run `pytest lessons/03-rope` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

import torch

REFERENCE = {
    "rope_tables": "minimind_v.rope:rope_tables",
    "rotate_half": "minimind_v.rope:rotate_half",
    "apply_rope": "minimind_v.rope:apply_rope",
}


def rope_tables(head_dim: int, max_len: int, theta: float = 1e6,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim).

    Row t, column c: angle t * theta^(-2i/head_dim) with i = c mod (head_dim/2), i.e. the
    head_dim/2 angles written twice (once per half). Compute in float64, return `dtype`.
    """
    raise NotImplementedError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., hd): (x1, x2) -> (-x2, x1), where x1, x2 are the two halves of the last dim."""
    raise NotImplementedError


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, hd), k (B, T, H_kv, hd), cos/sin (T, hd) -> rotated q, k (same shapes, dtypes).

    x_rot = x * cos + rotate_half(x) * sin, with cos/sin broadcast over batch and heads.
    """
    raise NotImplementedError
