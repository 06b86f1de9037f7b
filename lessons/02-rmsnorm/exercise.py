"""Lesson 02 exercises: RMSNorm.

Run `pytest lessons/02-rmsnorm` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

import torch
from torch import nn

REFERENCE = {
    "rms_norm": "minimind_v.norm:rms_norm",
    "RMSNorm": "minimind_v.norm:RMSNorm",
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) in x's dtype.

    y = x / sqrt(mean(x^2 over the last dim) + eps) * weight, with the mean of squares computed in
    at least float32 (bf16/fp16 inputs are upcast; float64 stays float64), the normalised row cast
    back to x.dtype, then multiplied by weight.
    """
    raise NotImplementedError


class RMSNorm(nn.Module):
    """Holds `self.weight` (nn.Parameter of ones, shape (dim,)) and `self.eps`; forward = rms_norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
