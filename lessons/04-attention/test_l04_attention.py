"""Grades lesson 04 against torch: repeat_interleave, scaled_dot_product_attention, torch.cat."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def test_repeat_kv(ex):
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    for n_rep in (1, 4):
        got = ex.repeat_kv(x, n_rep)
        assert got.shape == (2, 5, 3 * n_rep, 4), f"repeat_kv(x (2,5,3,4), {n_rep}) has shape {tuple(got.shape)}"
        assert torch.equal(got, x.repeat_interleave(n_rep, dim=2)), (
            f"n_rep={n_rep}: head j must be kv head j // n_rep (each kv head repeated in place: 0 0 0 0 1 1 1 1 ...), "
            "not the heads tiled (0 1 2 0 1 2 ...)")


def test_causal_mask(ex):
    assert torch.equal(ex.causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril()), \
        f"causal_mask(4, 4) should be the lower triangle (diagonal included), got\n{ex.causal_mask(4, 4).int()}"
    T, S = 2, 6                                 # two new queries after 4 cached tokens
    expected = torch.tensor([[j <= 4 + i for j in range(S)] for i in range(T)])
    got = ex.causal_mask(T, S)
    assert torch.equal(got, expected), (
        f"causal_mask(2, 6) (2 new queries after 4 cached keys) gave\n{got.int()}\nexpected\n{expected.int()}\n"
        "query i sits at position S - T + i and sees keys 0 .. S - T + i")


def test_attend_causal_gqa_matches_sdpa(ex):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 7, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 16, generator=g, dtype=torch.float64)      # 2 kv heads for 8 queries
    v = torch.randn(2, 2, 7, 16, generator=g, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    kk = ex.repeat_kv(k.transpose(1, 2), 4).transpose(1, 2)
    vv = ex.repeat_kv(v.transpose(1, 2), 4).transpose(1, 2)
    before = [t.clone() for t in (q, kk, vv)]
    out = ex.attend(q, kk, vv, ex.causal_mask(7, 7))
    assert all(torch.equal(a, b) for a, b in zip((q, kk, vv), before)), "attend changed q, k or v in place"
    assert out.dtype == torch.float64, f"float64 inputs gave {out.dtype}: the softmax runs in at least float32, " \
                                       "float64 stays float64, and the result has q's dtype"
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: (
        "causal attention differs from F.scaled_dot_product_attention: softmax(q k^T / sqrt(hd)) over the keys "
        f"(the last dim), masked entries excluded, times v (in float64: 1e-10)\n{m}"))


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
    assert out.dtype == torch.float32, f"float32 inputs gave {out.dtype}: return q's dtype"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"with a padding mask (B, 1, T, S), True = may attend, the result is wrong\n{m}")
    blind = ex.attend(q, k, v, torch.zeros(3, 9, dtype=torch.bool))
    assert torch.isfinite(blind).all(), ("a query that may attend to no key gave NaN/inf: fill masked scores with "
                                         "torch.finfo(dtype).min, not -inf")


def test_attend_bf16_returns_bf16(ex):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g).bfloat16() for _ in range(3))
    out = ex.attend(q, k, v, ex.causal_mask(5, 5))
    assert out.dtype == torch.bfloat16, f"bfloat16 inputs gave {out.dtype}: cast the result back to q's dtype"
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2, msg="bfloat16 attention is off")


def test_attend_dropout_only_in_training(ex):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    mask = ex.causal_mask(6, 6)
    plain = ex.attend(q, k, v, mask)
    evaluated = ex.attend(q, k, v, mask, dropout_p=0.5, training=False)
    assert torch.equal(evaluated, plain), "dropout_p=0.5 with training=False changed the output: no dropout in eval"
    trained = ex.attend(q, k, v, mask, dropout_p=0.5, training=True)
    assert not torch.allclose(trained, plain), "dropout_p=0.5 with training=True changed nothing: drop probabilities"


def _cat(pieces, i):
    return torch.cat([p[i] for p in pieces], dim=1)


def test_kv_cache_appends_in_place(ex):
    g = torch.Generator().manual_seed(4)
    cache = ex.KVCache()
    pieces = {0: [], 1: []}
    for step, T in enumerate((5,) + (1,) * 21):
        for layer in (0, 1):
            k, v = torch.randn(2, T, 2, 4, generator=g), torch.randn(2, T, 2, 4, generator=g)
            pieces[layer].append((k, v))
            ks, vs = cache.update(layer, k, v)
            want_k, want_v = _cat(pieces[layer], 0), _cat(pieces[layer], 1)
            assert ks.shape == want_k.shape, (f"layer {layer}, after {want_k.shape[1]} tokens: update returned keys "
                                              f"of shape {tuple(ks.shape)}, expected {tuple(want_k.shape)} (B, past + T, H_kv, hd)")
            for name, got, want in (("key", ks, want_k), ("value", vs, want_v)):
                wrong = (got != want).any(-1).any(-1).any(0).nonzero().flatten().tolist()
                assert not wrong, (
                    f"layer {layer}, after {want.shape[1]} tokens: the {name} at position {wrong[0]} is wrong"
                    + (" (an old entry changed: when the buffer grew, were the old entries copied?)"
                       if wrong[0] < want.shape[1] - T else " (the newest tokens were not stored in place)")
                    + (" - is each layer kept separately?" if layer == 1 else ""))
    assert cache.length == 26, f"cache.length is {cache.length} after 26 tokens per layer"
    # no re-copy of the history: while capacity lasts, the buffer stays where it is
    cap, ptr = cache.keys[0].shape[1], cache.keys[0].data_ptr()
    assert cap >= 26, f"cache.keys[0] has room for {cap} positions but holds 26: keys[layer] is the whole buffer"
    for _ in range(cap - cache.length):
        cache.update(0, torch.randn(2, 1, 2, 4, generator=g), torch.randn(2, 1, 2, 4, generator=g))
        assert cache.keys[0].data_ptr() == ptr, ("with room left, the key buffer moved: write the new token into the "
                                                 "preallocated buffer instead of building a new tensor (torch.cat)")
    old = cache.keys[0][:, :cap].clone()
    ks, _ = cache.update(0, torch.randn(2, 1, 2, 4, generator=g), torch.randn(2, 1, 2, 4, generator=g))
    assert cache.keys[0].shape[1] >= 2 * cap, (f"a full buffer of {cap} grew to {cache.keys[0].shape[1]}: double the "
                                               "capacity, so that growing stays rare")
    changed = (ks[:, :cap] != old).any(-1).any(-1).any(0).nonzero().flatten().tolist()
    assert not changed, (f"after the cache grew past its capacity, the key at position {changed[0]} changed: "
                         "old entries were not copied")
