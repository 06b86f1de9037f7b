"""RMSNorm: the normalisation in front of every attention and FFN block, and at the top.

    y = x / sqrt(mean(x^2) + eps) * weight

Unlike LayerNorm it does not subtract the mean and has no bias: one reduction per row
instead of two. The statistic is computed in (at least) float32 even for bf16/fp16 inputs (a mean of
squares in half precision loses digits fast), and the result is cast back to the input dtype
before the weight multiply, as Llama and MiniMind do.

`RMSNorm(dim, eps, impl)` uses `rms_norm` below ("eager", raw torch ops) or the hand-written
fused C++/CUDA op from `kernels/` ("fused", see `minimind_v.ops`). `rms_norm_backward` and
`RMSNormFunction` are the backward derived by hand, which the fused kernels implement.
The default, "auto", runs the fused op on a CPU and `rms_norm` everywhere else (`_fused_here`):
the two compute the same numbers, and the eager ops, five passes over memory forward and more
backward, were a tenth of a bf16 training step. Under CPU autocast the fused op writes y in
autocast's dtype (`ops.fused_rms_norm_to`): the product that follows would cast it to that anyway.
"""
from __future__ import annotations

import torch
from torch import nn


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)   # float32, or float64 for float64


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """x (..., D), weight (D,) -> y (..., D) in promote(x, w) dtype, rstd (...) float32/float64.

    rstd = 1 / sqrt(mean(x^2) + eps) is one number per row: all the backward needs besides x and w.
    """
    xf = x.to(_acc_dtype(x.dtype))                                   # (..., D) at least float32
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)                  # (...,)
    y = weight * (xf * rstd.unsqueeze(-1)).to(x.dtype)                # (..., D)
    return y, rstd


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D): y = x / sqrt(mean(x^2) + eps) * weight."""
    return rms_norm_forward(x, weight, eps)[0]


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Gradients of y = w * x * r by hand (lesson 11): grad_y (..., D), x (..., D), weight (D,), rstd (...).

    With n = x * r and dn = g * w:  dx = r * (dn - n * mean(dn * n)),  dw = sum_rows(g * n).
    Returns dx (..., D) in x's dtype and dw (D,) in weight's dtype. The fused kernels in
    `kernels/` implement exactly these two lines.
    """
    acc = _acc_dtype(x.dtype)
    xf, g, w = x.to(acc), grad_y.to(acc), weight.to(acc)
    r = rstd.to(acc).unsqueeze(-1)                                    # (..., 1)
    dn = g * w                                                        # (..., D)
    n = xf * r                                                        # (..., D)
    dx = r * (dn - n * (dn * n).mean(dim=-1, keepdim=True))           # (..., D)
    dw = (g * n.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0)  # (D,)
    return dx.to(x.dtype), dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with the hand-written backward; saves x, w and rstd only.  apply(x, weight, eps)."""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(grad_y, x, weight, rstd)
        return dx, dw, None


_REFERENCE_RMS_NORM = rms_norm


def _fused_here(x: torch.Tensor) -> bool:
    """impl="auto"'s choice for this input: the fused op, unless
    - x is not on a CPU (the CUDA kernel is opt-in: impl="fused"),
    - the code is being compiled (the compiler fuses the eager ops itself),
    - `rms_norm` has been replaced (learner mode: the model runs your function),
    - or the kernels cannot be built here (`ops.available` warns once, saying why)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or rms_norm is not _REFERENCE_RMS_NORM:
        return False
    from . import ops
    return ops.available()


def _autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """bf16/fp16 when the fused norm runs under CPU autocast on float32 x and weight, else None."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    low = torch.get_autocast_dtype("cpu")
    ok = x.dtype == weight.dtype == torch.float32 and low in (torch.bfloat16, torch.float16)
    return low if ok else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "auto"):
        super().__init__()
        if impl not in ("auto", "eager", "fused"):
            raise ValueError(f"RMSNorm impl must be 'auto', 'eager' or 'fused', got {impl!r}")
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "fused" or (self.impl == "auto" and _fused_here(x)):
            from . import ops  # the kernels are built/loaded on the first call
            low = _autocast_dtype(x, self.weight)
            if low is not None:   # the next product would cast y to it: write it in that dtype at once
                return ops.fused_rms_norm_to(x, self.weight, self.eps, low)
            return ops.fused_rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, impl={self.impl!r}"
