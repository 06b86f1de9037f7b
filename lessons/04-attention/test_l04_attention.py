"""Grades lesson 04 against torch: repeat_interleave, scaled_dot_product_attention, torch.cat."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def test_repeat_kv(ex):
    x = torch.randn(2, 5, 3, 4)
    for n_rep in (1, 4):
        assert torch.equal(ex.repeat_kv(x, n_rep), x.repeat_interleave(n_rep, dim=2))


def test_causal_mask(ex):
    assert torch.equal(ex.causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())
    T, S = 2, 6                                 # two new queries after 4 cached tokens
    expected = torch.tensor([[j <= 4 + i for j in range(S)] for i in range(T)])
    assert torch.equal(ex.causal_mask(T, S), expected)


def test_attend_causal_gqa_matches_sdpa(ex):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 7, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 16, generator=g, dtype=torch.float64)      # 2 kv heads for 8 queries
    v = torch.randn(2, 2, 7, 16, generator=g, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    kk = ex.repeat_kv(k.transpose(1, 2), 4).transpose(1, 2)
    vv = ex.repeat_kv(v.transpose(1, 2), 4).transpose(1, 2)
    out = ex.attend(q, kk, vv, ex.causal_mask(7, 7))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_attend_with_padding_and_offset(ex):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 8, generator=g)                # 3 new queries
    k = torch.randn(2, 4, 9, 8, generator=g)                # after 6 cached keys
    v = torch.randn(2, 4, 9, 8, generator=g)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :4] = False                                      # row 1 is left-padded
    mask = ex.causal_mask(3, 9)[None, None] & pad[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = ex.attend(q, k, v, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a query that sees nothing must not produce NaN
    blind = ex.attend(q, k, v, torch.zeros(3, 9, dtype=torch.bool))
    assert torch.isfinite(blind).all()


def test_kv_cache_appends_in_place(ex):
    cache = ex.KVCache()
    pieces = {0: [], 1: []}
    for T in (5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1):
        for layer in (0, 1):
            k, v = torch.randn(2, T, 2, 4), torch.randn(2, T, 2, 4)
            pieces[layer].append((k, v))
            ks, vs = cache.update(layer, k, v)
            assert torch.equal(ks, torch.cat([p[0] for p in pieces[layer]], dim=1))
            assert torch.equal(vs, torch.cat([p[1] for p in pieces[layer]], dim=1))
    assert cache.length == 26
    # no re-copy of the history: while capacity lasts, the buffer stays where it is
    cap, ptr = cache.keys[0].shape[1], cache.keys[0].data_ptr()
    for _ in range(cap - cache.length):
        cache.update(0, torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
        assert cache.keys[0].data_ptr() == ptr
    cache.update(0, torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))     # full: grows once
    assert cache.keys[0].shape[1] >= 2 * cap
