"""Grades lesson 03: RoPE tables, rotate_half, apply_rope."""
from __future__ import annotations

import math

import torch

HD = 8


def _complex_rope(x, positions, theta):
    """Reference: pair (i, i + hd/2) as the complex number x_i + j x_{i+hd/2}, times exp(j pos theta_i)."""
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[:, None] * inv_freq[None, :]                  # (T, hd/2)
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def test_tables(ex):
    cos, sin = ex.rope_tables(HD, 20, 1e4)
    assert cos.shape == sin.shape == (20, HD) and cos.dtype == torch.float32
    for t in (0, 1, 19):
        for c in range(HD):
            angle = t * 1e4 ** (-2 * (c % (HD // 2)) / HD)
            assert abs(float(cos[t, c]) - math.cos(angle)) < 1e-6
            assert abs(float(sin[t, c]) - math.sin(angle)) < 1e-6


def test_rotate_half(ex):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert torch.equal(ex.rotate_half(x), torch.tensor([[-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]]))


def test_apply_rope_equals_complex_form_at_an_offset(ex):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, HD, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 2, HD, generator=g, dtype=torch.float64)
    cos, sin = ex.rope_tables(HD, 32, 1e6, dtype=torch.float64)
    qr, kr = ex.apply_rope(q, k, cos[10:15], sin[10:15])      # tokens at positions 10..14
    pos = torch.arange(10, 15)
    torch.testing.assert_close(qr, _complex_rope(q, pos, 1e6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kr, _complex_rope(k, pos, 1e6), rtol=1e-12, atol=1e-12)


def test_relative_position_and_norm(ex):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, HD, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, HD, generator=g, dtype=torch.float64)
    cos, sin = ex.rope_tables(HD, 100, 1e4, dtype=torch.float64)

    def rot(x, p):
        return ex.apply_rope(x, x, cos[p:p + 1], sin[p:p + 1])[0].flatten()

    for offset in (0, 3, 20):
        s = [float(rot(q, m + offset) @ rot(k, m)) for m in (0, 7, 60)]
        assert max(s) - min(s) < 1e-10, f"offset {offset}: scores {s} differ"
        assert abs(float(rot(q, 42).norm() - q.norm())) < 1e-12
    assert abs(float(rot(q, 3) @ rot(k, 0) - rot(q, 20) @ rot(k, 0))) > 1e-3
