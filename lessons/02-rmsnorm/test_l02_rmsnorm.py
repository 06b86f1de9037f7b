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
    y = ex.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, F.rms_norm(x, (32,), w, eps=1e-5), rtol=tol, atol=tol)


def test_eps_is_used(ex):
    x = torch.full((1, 4), 1e-3, dtype=torch.float64)
    y = ex.rms_norm(x, torch.ones(4, dtype=torch.float64), 1e-2)
    torch.testing.assert_close(y, F.rms_norm(x, (4,), eps=1e-2))
    assert float(y[0, 0]) < 0.02               # eps dominates a tiny row


def test_bf16_in_bf16_out_with_float32_statistic(ex):
    x, w = _inputs(torch.bfloat16)
    y = ex.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    exact = F.rms_norm(x.double(), (32,), w.double(), eps=1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=1e-2, atol=1e-2)
    # 4096 threes: a bf16 sum of squares would drift; the float32 statistic gives exactly 1
    ones = ex.rms_norm(torch.full((1, 4096), 3.0, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16), 0.0)
    assert torch.all(ones == 1.0)


def test_module(ex):
    norm = ex.RMSNorm(32, eps=1e-6)
    assert isinstance(norm.weight, torch.nn.Parameter) and torch.equal(norm.weight.data, torch.ones(32))
    x, w = _inputs(torch.float32, seed=1)
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), w, eps=1e-6), rtol=1e-5, atol=1e-5)
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
