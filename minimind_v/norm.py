"""RMSNorm: the normalisation in front of every attention and FFN block, and at the top.

    y = x / sqrt(mean(x^2) + eps) * weight

Unlike LayerNorm it does not subtract the mean and has no bias: one reduction per row
instead of two. The statistic is computed in (at least) float32 even for bf16/fp16 inputs (a mean of
squares in half precision loses digits fast), and the result is cast back to the input dtype
before the weight multiply, as Llama and MiniMind do.

`RMSNorm(dim, eps, impl)` uses `rms_norm` below ("eager", raw torch ops) or the hand-written
fused C++/CUDA op from `kernels/` ("fused", see `minimind_v.ops`).
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))   # (..., D) at least float32
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)   # (..., 1)
    return weight * (xf * inv_rms).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "eager"):
        super().__init__()
        if impl not in ("eager", "fused"):
            raise ValueError(f"RMSNorm impl must be 'eager' or 'fused', got {impl!r}")
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "fused":
            from . import ops  # builds/loads the kernels on first use
            return ops.fused_rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, impl={self.impl!r}"
