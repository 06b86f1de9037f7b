"""Grades lesson 11: the hand-derived RMSNorm backward, the autograd.Function, and agreement with
the fused C++ op (minimind_v.ops)."""
from __future__ import annotations

import pytest
import torch

from minimind_v.norm import rms_norm


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype)
    w = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, gy


def _autograd_grads(x, w, gy, eps):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = rms_norm(x, w, eps)
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def test_forward_returns_y_and_rstd(ex):
    x, w, _ = _inputs((3, 5, 24), torch.float32)
    y, rstd = ex.rms_norm_forward(x, w, 1e-5)
    assert y.shape == x.shape and rstd.shape == (3, 5) and rstd.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd, 1 / x.pow(2).mean(-1).add(1e-5).sqrt(), atol=1e-6, rtol=1e-6)


def test_forward_bf16_with_float32_weight_promotes_like_eager(ex):
    x, w, _ = _inputs((4, 40), torch.bfloat16)
    y, rstd = ex.rms_norm_forward(x, w.float(), 1e-5)
    assert y.dtype == torch.float32 and rstd.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm(x, w.float(), 1e-5))


@pytest.mark.parametrize("shape", [(7, 1), (2, 3, 50), (1, 257)], ids=str)
def test_backward_matches_autograd_float64(ex, shape):
    x, w, gy = _inputs(shape, torch.float64, seed=1)
    _, dx_ref, dw_ref = _autograd_grads(x, w, gy, 1e-5)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)          # computed here, not by your forward
    dx, dw = ex.rms_norm_backward(gy, x, w, rstd)
    assert dx.shape == x.shape and dw.shape == w.shape
    torch.testing.assert_close(dx, dx_ref, atol=1e-12, rtol=1e-10, msg=lambda m: (
        f"dx differs from autograd's: dx = rstd * (g*w - x * rstd^2 * mean(g*w*x)), the mean term included\n{m}"))
    torch.testing.assert_close(dw, dw_ref, atol=1e-12, rtol=1e-10, msg=lambda m: (
        f"dw differs from autograd's: the sum over ALL rows of g * x * rstd\n{m}"))


def test_backward_bf16_dtypes_and_values(ex):
    x, w, gy = _inputs((16, 64), torch.bfloat16, seed=2)
    _, dx_ref, dw_ref = _autograd_grads(x, w, gy, 1e-5)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5)
    dx, dw = ex.rms_norm_backward(gy, x, w, rstd)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16, \
        f"bf16 in: dx is {dx.dtype}, dw {dw.dtype}; return dx in x's dtype and dw in weight's"
    torch.testing.assert_close(dx.float(), dx_ref.float(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dw.float(), dw_ref.float(), atol=2e-1, rtol=2e-2)


def test_function_gradcheck(ex):
    x, w, _ = _inputs((4, 9), torch.float64, seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ex.RMSNormFunction.apply(a, b, 1e-5), (x, w))


def test_function_saves_only_x_weight_and_rstd(ex):
    x, w, _ = _inputs((8, 32), torch.float32, seed=4)
    x.requires_grad_(True)
    w.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ex.RMSNormFunction.apply(x, w, 1e-5)
    assert sorted(t.numel() for t in saved) == [8, 32, 8 * 32], (
        f"saved tensors of sizes {sorted(t.numel() for t in saved)}: save only x, weight and rstd (not y)")
    torch.testing.assert_close(y, rms_norm(x.detach(), w.detach(), 1e-5), atol=1e-6, rtol=1e-6)


def test_fused_op_agrees_with_your_function(ex):
    from minimind_v import ops   # builds kernels/rmsnorm.cpp on first use (cached)

    x, w, gy = _inputs((5, 3, 96), torch.float32, seed=5)
    a = [t.clone().requires_grad_(True) for t in (x, w)]
    b = [t.clone().requires_grad_(True) for t in (x, w)]
    y_mine = ex.RMSNormFunction.apply(a[0], a[1], 1e-5)
    y_fused = ops.fused_rms_norm(b[0], b[1], 1e-5)
    y_mine.backward(gy)
    y_fused.backward(gy)
    torch.testing.assert_close(y_mine, y_fused, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[0].grad, b[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1].grad, b[1].grad, atol=1e-5, rtol=1e-5)
