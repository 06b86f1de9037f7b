"""Grades lesson 02: rms_norm and RMSNorm against torch.nn.functional.rms_norm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 6, 32, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype)
    w = (torch.rand(32, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_torch(ex, dtype, tol):
    x, w = _inputs(dtype)
    before = x.clone()
    y = ex.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape, f"the output has shape {tuple(y.shape)}, the input {tuple(x.shape)}: they must agree"
    assert y.dtype == dtype, f"a {dtype} input gave a {y.dtype} output: return x's dtype"
    assert torch.equal(x, before), "rms_norm changed its input x in place: compute into a new tensor"
    torch.testing.assert_close(y, F.rms_norm(x, (32,), w, eps=1e-5), rtol=tol, atol=tol,
                               msg=lambda m: f"{dtype}: not torch's rms_norm (mean of squares over the last "
                                             f"dim, + eps, rsqrt, times weight)\n{m}")


def test_eps_is_used(ex):
    x = torch.full((1, 4), 1e-3, dtype=torch.float64)
    y = ex.rms_norm(x, torch.ones(4, dtype=torch.float64), 1e-2)
    assert float(y[0, 0]) < 0.02, (f"a row of 1e-3 with eps=1e-2 gave {float(y[0, 0]):.3g}, expected ~0.01: "
                                   "eps must be added to the mean of squares, inside the square root")
    torch.testing.assert_close(y, F.rms_norm(x, (4,), eps=1e-2), msg="eps is not used as sqrt(mean(x^2) + eps)")


def test_bf16_in_bf16_out_with_float32_statistic(ex):
    x, w = _inputs(torch.bfloat16)
    y = ex.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16, f"a bfloat16 input gave {y.dtype}: cast the result back to x's dtype"
    exact = F.rms_norm(x.double(), (32,), w.double(), eps=1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=1e-2, atol=1e-2, msg="bfloat16 values are off")
    # with weight 1 the result is the exactly rounded x / rms: a bf16 statistic is off in ~1 value of 4
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 256, generator=g, dtype=torch.float64) * 2 + 0.3).bfloat16()
    y = ex.rms_norm(x, torch.ones(256, dtype=torch.bfloat16), 1e-5)
    exact = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    off = (y != exact).float().mean().item()
    assert off < 0.02, (f"{off:.0%} of the bfloat16 outputs are not the rounded exact value: compute the mean of "
                        "squares and the normalised row in float32 (x.float()), cast to bf16 only at the end")
    # 4096 threes: a bf16 sum of squares would drift; the float32 statistic gives exactly 1
    ones = ex.rms_norm(torch.full((1, 4096), 3.0, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16), 0.0)
    assert torch.all(ones == 1.0), (f"4096 threes normalised to {ones.float().unique().tolist()[:4]}, not exactly 1: "
                                    "the mean of squares must be computed in float32 (upcast bf16 first)")


def test_module(ex):
    norm = ex.RMSNorm(32, eps=0.25)
    assert isinstance(norm.weight, torch.nn.Parameter), "RMSNorm.weight must be an nn.Parameter (so it trains)"
    assert torch.equal(norm.weight.data, torch.ones(32)), "RMSNorm.weight must start as ones"
    x, w = _inputs(torch.float32, seed=1)
    x = x * 0.3                                   # small rows: eps=0.25 matters
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), w, eps=0.25), rtol=1e-5, atol=1e-5,
                               msg="RMSNorm(32, eps=0.25)(x) is not rms_norm(x, weight, 0.25): is eps stored and used?")
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0, "no gradient reached RMSNorm.weight"
