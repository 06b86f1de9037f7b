"""Lesson 11 exercises: RMSNorm's backward by hand, then a fused op.

Run `pytest lessons/11-fused-rmsnorm-kernel` to grade your code (`--reference` grades minimind_v).
The C++ kernel (kernels/rmsnorm.cpp) does exactly what these three functions do, row by row.
"""
from __future__ import annotations

import torch

REFERENCE = {
    "rms_norm_forward": "minimind_v.norm:rms_norm_forward",
    "rms_norm_backward": "minimind_v.norm:rms_norm_backward",
    "RMSNormFunction": "minimind_v.norm:RMSNormFunction",
}


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """x (..., D), weight (D,) -> (y (..., D), rstd (...)).

    rstd = 1 / sqrt(mean(x^2 over the last dim) + eps), computed in float32 (float64 for float64 x).
    y = weight * (x * rstd) cast to x.dtype -- the same values as minimind_v.norm.rms_norm, so y has
    the dtype torch gives weight * (a tensor of x.dtype).
    """
    raise NotImplementedError


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """grad_y (..., D), x (..., D), weight (D,), rstd (...) -> (dx (..., D), dw (D,)).

    The gradients of y = weight * x * rstd, derived by hand (see the README):
        dx = rstd * (grad_y*w - x * rstd^2 * mean(grad_y*w*x))
        dw = sum over all rows of grad_y * (x * rstd)
    Compute in float32 (float64 for float64 x); return dx in x.dtype and dw in weight.dtype.
    """
    raise NotImplementedError


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with your hand-written backward.  RMSNormFunction.apply(x, weight, eps) -> y.

    forward: compute y and rstd with rms_norm_forward, save only x, weight and rstd for backward.
    backward: one gradient per forward input (x, weight, eps) -- eps gets None.
    """

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad_y):
        raise NotImplementedError
