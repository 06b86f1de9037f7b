"""rms_norm / RMSNorm against torch.nn.functional.rms_norm, in float64, float32 and bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.norm import RMSNorm, rms_norm


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 5, 64, generator=g, dtype=torch.float64) * 3 + 0.5).to(dtype)
    w = (torch.rand(64, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rms_norm_matches_torch(dtype, tol):
    x, w = _inputs(dtype)
    ours = rms_norm(x, w, eps=1e-5)
    ref = F.rms_norm(x, (64,), w, eps=1e-5)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_rms_norm_bf16_input():
    x, w = _inputs(torch.bfloat16)
    ours = rms_norm(x, w, eps=1e-5)
    assert ours.dtype == torch.bfloat16
    ref = F.rms_norm(x, (64,), w, eps=1e-5)
    # both round to bf16 (8 bits of mantissa): at most ~2 bf16 ulps apart
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    # and ours is as close to the exact float64 answer as bf16 rounding allows
    exact = F.rms_norm(x.double(), (64,), w.double(), eps=1e-5)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-2, atol=1e-2)


def test_bf16_statistic_is_computed_in_float32():
    # 4096 values of 3.0: a bf16 running mean of squares would drift; float32 gives rms exactly 3
    x = torch.full((1, 4096), 3.0, dtype=torch.bfloat16)
    y = rms_norm(x, torch.ones(4096, dtype=torch.bfloat16), eps=0.0)
    assert torch.all(y == 1.0)


def test_module_matches_function_and_grads_match_torch():
    x, w = _inputs(torch.float64, seed=1)
    norm = RMSNorm(64, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(w)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    wb = w.clone().requires_grad_(True)
    out = norm(xa)
    ref = F.rms_norm(xb, (64,), wb, eps=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(norm.weight.grad, wb.grad, rtol=1e-10, atol=1e-10)


def test_rows_have_unit_rms():
    x, _ = _inputs(torch.float64, seed=2)
    y = rms_norm(x, torch.ones(64, dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 5, dtype=torch.float64))


def test_bad_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        RMSNorm(8, impl="cuda-magic")
