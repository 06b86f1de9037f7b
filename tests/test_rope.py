"""RoPE: equals the complex-number formulation; scores depend only on relative position; norms kept."""
from __future__ import annotations

import torch

from minimind_v.rope import apply_rope, rope_tables, rotate_half

HD = 16


def _complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """The paper's form: pair (x_i, x_{i+hd/2}) is the complex number x_i + j x_{i+hd/2},
    multiplied by exp(j * pos * theta^(-2i/hd)). x (B, T, H, hd) float64."""
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)      # (hd/2,)
    angles = positions.double()[:, None] * inv_freq[None, :]                     # (T, hd/2)
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]         # (1, T, 1, hd/2)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def test_tables_shape_and_first_row():
    cos, sin = rope_tables(HD, 10, theta=1e6)
    assert cos.shape == sin.shape == (10, HD)
    assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)
    # row t, column i: angle t * theta^(-2i/hd), repeated for both halves
    torch.testing.assert_close(cos[3, 1].double(), torch.tensor(3 * 1e6 ** (-2 / HD), dtype=torch.float64).cos(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cos[:, : HD // 2], cos[:, HD // 2:])


def test_rotate_half():
    x = torch.arange(1.0, 7.0)
    torch.testing.assert_close(rotate_half(x), torch.tensor([-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]))


def test_equals_complex_formulation():
    g = torch.Generator().manual_seed(0)
    T = 12
    q = torch.randn(2, T, 4, HD, generator=g, dtype=torch.float64)
    k = torch.randn(2, T, 2, HD, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(HD, 64, theta=1e4, dtype=torch.float64)
    start = 7                                          # a cached-decoding offset
    qr, kr = apply_rope(q, k, cos[start:start + T], sin[start:start + T])
    pos = torch.arange(start, start + T)
    torch.testing.assert_close(qr, _complex_rope(q, pos, 1e4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kr, _complex_rope(k, pos, 1e4), rtol=1e-12, atol=1e-12)


def test_score_depends_only_on_offset_and_norms_are_kept():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(HD, generator=g, dtype=torch.float64)
    k = torch.randn(HD, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(HD, 200, theta=1e6, dtype=torch.float64)

    def rot(x, p):
        out, _ = apply_rope(x[None, None, None], x[None, None, None], cos[p:p + 1], sin[p:p + 1])
        return out.flatten()

    for offset in (0, 1, 5, 37):
        scores = torch.stack([rot(q, m + offset) @ rot(k, m) for m in (0, 3, 50, 150)])
        torch.testing.assert_close(scores, scores[:1].expand(4), rtol=1e-10, atol=1e-10)
    # different offsets give different scores (the position is really there)
    assert abs(float(rot(q, 5) @ rot(k, 0) - rot(q, 9) @ rot(k, 0))) > 1e-3
    for p in (0, 17, 199):
        torch.testing.assert_close(rot(q, p).norm(), q.norm(), rtol=1e-12, atol=1e-12)


def test_matches_transformers_llama_rope():
    llama = __import__("pytest").importorskip("transformers.models.llama.modeling_llama")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 9, 4, HD, generator=g)
    k = torch.randn(1, 9, 2, HD, generator=g)
    cos, sin = rope_tables(HD, 9, theta=1e6)
    qr, kr = apply_rope(q, k, cos, sin)
    # transformers works in (B, H, T, hd) with cos/sin (B, T, hd)
    hq, hk = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
    torch.testing.assert_close(qr, hq.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kr, hk.transpose(1, 2), rtol=1e-6, atol=1e-6)
