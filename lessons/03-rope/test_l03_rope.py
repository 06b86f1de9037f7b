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
    assert cos.shape == sin.shape == (20, HD), f"tables of shape {tuple(cos.shape)}, expected (max_len, head_dim) = (20, {HD})"
    assert cos.dtype == torch.float32, f"the tables are {cos.dtype}, expected the default dtype=torch.float32"
    for t in (0, 1, 19):
        for c in range(HD):
            angle = t * 1e4 ** (-2 * (c % (HD // 2)) / HD)
            assert abs(float(cos[t, c]) - math.cos(angle)) < 1e-6 and abs(float(sin[t, c]) - math.sin(angle)) < 1e-6, (
                f"row {t}, column {c}: cos {float(cos[t, c]):.6f} / sin {float(sin[t, c]):.6f}, expected the angle "
                f"{t} * theta^(-2*{c % (HD // 2)}/{HD}) = {angle:.6f}: column c uses frequency c mod hd/2 "
                "(the hd/2 angles written twice, not each angle twice in a row)")


def test_rotate_half(ex):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    got = ex.rotate_half(x)
    assert torch.equal(got, torch.tensor([[-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]])), (
        f"rotate_half([1..6]) gave {got.tolist()}, expected [-4, -5, -6, 1, 2, 3]: the halves are (1, 2, 3) and "
        "(4, 5, 6), the result is (-second half, first half) (not pairs of neighbours)")


def test_apply_rope_equals_complex_form_at_an_offset(ex):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, HD, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 2, HD, generator=g, dtype=torch.float64)
    cos, sin = ex.rope_tables(HD, 32, 1e6, dtype=torch.float64)
    qr, kr = ex.apply_rope(q, k, cos[10:15], sin[10:15])      # tokens at positions 10..14
    pos = torch.arange(10, 15)
    assert qr.shape == q.shape and kr.shape == k.shape, "apply_rope must keep the shapes of q (B,T,H,hd) and k (B,T,H_kv,hd)"
    torch.testing.assert_close(qr, _complex_rope(q, pos, 1e6), rtol=1e-12, atol=1e-12, msg=lambda m: (
        "rotated q differs from the complex-number rotation of the pairs (i, i + hd/2) by position * theta_i "
        f"(x * cos + rotate_half(x) * sin, cos/sin broadcast over batch and heads; float64 tables give 1e-12)\n{m}"))
    torch.testing.assert_close(kr, _complex_rope(k, pos, 1e6), rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"rotated k is wrong (q was right: is k rotated the same way?)\n{m}")


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
