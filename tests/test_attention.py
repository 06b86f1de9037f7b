"""Attention: repeat_kv, masks, the hand-written path vs F.scaled_dot_product_attention, KVCache."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.attention import (Attention, KVCache, attend, attend_grouped, build_mask, causal_attend_blocked,
                                  causal_mask, repeat_kv, softmax_scores)
from minimind_v.config import LMConfig
from minimind_v.rope import apply_rope, rope_tables

CFG = dict(vocab_size=50, hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=2, max_seq_len=64)


def _attention(impl="manual", seed=0):
    torch.manual_seed(seed)
    attn = Attention(LMConfig(**CFG, attn_impl=impl)).double().eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return attn


def _tables(T, start=0):
    cos, sin = rope_tables(8, 64, theta=1e6, dtype=torch.float64)
    return cos[start:start + T], sin[start:start + T]


def _reference(attn, x, attn_mask):
    """The same layer written with F.scaled_dot_product_attention's own GQA (enable_gqa)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, 8, 8)
    k = attn.k_proj(x).view(B, T, 2, 8)
    v = attn.v_proj(x).view(B, T, 2, 8).transpose(1, 2)
    q, k = apply_rope(q, k, *_tables(T))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v,
                                         attn_mask=attn_mask, enable_gqa=True)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, 64))


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 5, 3, 4)
    for n_rep in (1, 2, 4):
        assert torch.equal(repeat_kv(x, n_rep), x.repeat_interleave(n_rep, dim=2))


def test_causal_mask_with_cache_offset():
    T, S = 3, 7                  # 3 new queries at absolute positions 4, 5, 6
    expected = torch.tensor([[j <= S - T + i for j in range(S)] for i in range(T)])
    assert torch.equal(causal_mask(T, S), expected)
    assert torch.equal(causal_mask(5, 5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_build_mask_combines_padding_and_checks_length():
    pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    m = build_mask(4, 4, pad)
    assert m.shape == (2, 1, 4, 4)
    assert not m[0, 0, :, 0].any() and m[1, 0, :, 0].all()
    assert torch.equal(m[1, 0], causal_mask(4, 4))
    with pytest.raises(ValueError, match="attention_mask covers 3 positions, but there are 4 keys"):
        build_mask(4, 4, pad[:, :3])


def test_attend_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = causal_mask(6, 6)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attend(q, k, v, mask), ref, rtol=1e-10, atol=1e-10)


def _sdpa_gqa(q, k, v):
    """Reference: repeat K/V heads with repeat_interleave, then causal SDPA. (B, T, heads, hd) in and out."""
    r = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(r, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def _assert_same_with_grads(out, ref, inputs, g, tol, grad_tol):
    """out == ref within tol, and the gradients of a random weighting of each w.r.t. inputs agree."""
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(grads, ref_grads):
        assert a.abs().max() > 1e-3
        torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("T,block,H,H_kv", [(640, 128, 8, 2), (300, 128, 6, 3), (37, 8, 4, 1), (5, 16, 2, 2),
                                            (64, 64, 4, 2)])
def test_blocked_causal_equals_full_mask_with_grads(T, block, H, H_kv):
    # T a multiple of the block, a ragged last block, T shorter than one block, exactly one block;
    # groups of 4, 2, 4 query heads per K/V head and plain multi-head (H == H_kv)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, H, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, T, H_kv, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = causal_attend_blocked(q, k, v, block=block)
    ref = _sdpa_gqa(q, k, v)
    assert out.shape == (2, T, H, 8)
    _assert_same_with_grads(out, ref, (q, k, v), g, tol=1e-10, grad_tol=1e-9)


@pytest.mark.parametrize("T,S,H,H_kv,padded", [(1, 23, 8, 2, False), (1, 23, 8, 2, True), (5, 12, 6, 3, True),
                                              (9, 9, 4, 1, True), (4, 10, 2, 2, False)])
def test_grouped_attend_equals_repeat_kv_attend_with_grads(T, S, H, H_kv, padded):
    # one decode step after a cache, a chunk after a cache, a padded prefill; groups of 4, 2, 4, 1
    g = torch.Generator().manual_seed(T * 100 + S)
    q = torch.randn(2, T, H, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, S, H_kv, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pad = torch.ones(2, S, dtype=torch.long)
    if padded:
        pad[0, :3] = 0          # left padding in row 0, a hole in row 1
        pad[1, S - T - 1] = 0 if S > T else 1
    mask = build_mask(T, S, pad if padded else None)                       # (B|1, 1, T, S)
    out = attend_grouped(q, k, v, mask if padded else causal_mask(T, S))
    r = H // H_kv
    ref = attend(q.transpose(1, 2), repeat_kv(k, r).transpose(1, 2), repeat_kv(v, r).transpose(1, 2),
                 mask).transpose(1, 2)
    assert out.shape == (2, T, H, 8)
    _assert_same_with_grads(out, ref, (q, k, v), g, tol=1e-12, grad_tol=1e-10)


def test_blocked_causal_bf16_close_to_float32():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 200, 4, 16, generator=g)
    k, v = (torch.randn(1, 200, 2, 16, generator=g) for _ in range(2))
    ref = causal_attend_blocked(q, k, v, block=64)
    out = causal_attend_blocked(q.bfloat16(), k.bfloat16(), v.bfloat16(), block=64)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)   # a few bf16 steps (2^-8)


def test_softmax_scores_is_the_float32_softmax_in_the_scores_dtype():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 40, 300, generator=g) * 6
    scores[:, :, 170:] = float("-inf")                    # masked keys, as the blocked path's bias gives
    for dtype in (torch.bfloat16, torch.float16):
        x = scores.to(dtype)
        out = softmax_scores(x)
        assert out.dtype == dtype
        assert torch.equal(out, x.softmax(dim=-1, dtype=torch.float32).to(dtype))   # the same numbers
    for dtype in (torch.float32, torch.float64):
        x = scores.to(dtype)
        assert torch.equal(softmax_scores(x), x.softmax(dim=-1))
    # the backward: within bf16 rounding of the float32 backward
    x = scores.bfloat16()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(3, 40, 300, generator=g).bfloat16()
    softmax_scores(a).backward(grad)
    a32 = b.float().detach().requires_grad_()
    a32.softmax(dim=-1).backward(grad.float())
    torch.testing.assert_close(a.grad.float(), a32.grad, rtol=0.01, atol=0.01 * a32.grad.abs().max().item())


def test_manual_layer_uses_blocked_path_when_plain_causal(monkeypatch):
    import minimind_v.attention as A
    calls = []
    real = A.causal_attend_blocked
    monkeypatch.setattr(A, "causal_attend_blocked", lambda *a, **k: calls.append(1) or real(*a, **k))
    attn = _attention("manual")
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    out = attn(x, *_tables(11), None)
    torch.testing.assert_close(out, _reference(attn, x, causal_mask(11, 11)), rtol=1e-10, atol=1e-10)
    assert calls == [1]


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_causal_gqa_layer_matches_sdpa_reference(impl):
    attn = _attention(impl)
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    out = attn(x, *_tables(11), build_mask(11, 11, None))
    ref = _reference(attn, x, causal_mask(11, 11))
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_padding_mask_matches_sdpa_reference(impl):
    attn = _attention(impl, seed=1)
    x = torch.randn(3, 9, 64, dtype=torch.float64)
    pad = torch.ones(3, 9, dtype=torch.long)
    pad[0, :4] = 0          # left padding
    pad[2, :1] = 0
    pad[1, 6] = 0           # a hole in the middle
    out = attn(x, *_tables(9), build_mask(9, 9, pad))
    full = causal_mask(9, 9)[None, None] & pad.bool()[:, None, None, :]
    ref = _reference(attn, x, full)
    real = pad.bool()       # rows of pad queries see nothing; their output is irrelevant
    torch.testing.assert_close(out[real], ref[real], rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()


def test_sdpa_path_equals_manual_path_with_cache():
    manual, sdpa = _attention("manual", seed=2), _attention("sdpa", seed=2)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    outs = []
    for layer in (manual, sdpa):
        cache = KVCache()
        a = layer(x[:, :7], *_tables(7), build_mask(7, 7, None), cache)             # prefill
        steps = [layer(x[:, t:t + 1], *_tables(1, t), build_mask(1, t + 1, None), cache) for t in range(7, 10)]
        outs.append(torch.cat([a, *steps], dim=1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    # and cached decoding equals one full pass
    full = manual(x, *_tables(10), build_mask(10, 10, None))
    torch.testing.assert_close(outs[0], full, rtol=1e-10, atol=1e-10)


def test_sdpa_path_equals_manual_path_in_float32_training():
    cfg = LMConfig(**CFG)
    torch.manual_seed(3)
    manual = Attention(cfg).train()
    sdpa = Attention(LMConfig(**CFG, attn_impl="sdpa")).train()
    sdpa.load_state_dict(manual.state_dict())
    x = torch.randn(2, 16, 64, requires_grad=True)
    cos, sin = rope_tables(8, 16)
    grads = []
    for layer in (manual, sdpa):
        out = layer(x, cos, sin, build_mask(16, 16, None))
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        grads.append((out, gx))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-4)


def test_kv_cache_appends_in_place_and_doubles():
    cache = KVCache()
    k0, v0 = torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 4)
    k, v = cache.update(0, k0, v0)
    assert torch.equal(k, k0) and torch.equal(v, v0) and cache.length == 5
    ptr, cap = cache.keys[0].data_ptr(), cache.keys[0].shape[1]
    pieces_k, pieces_v = [k0], [v0]
    grew_at = None
    for step in range(40):
        kn, vn = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
        pieces_k.append(kn)
        pieces_v.append(vn)
        k, v = cache.update(0, kn, vn)
        assert torch.equal(k, torch.cat(pieces_k, dim=1)) and torch.equal(v, torch.cat(pieces_v, dim=1))
        if cache.length <= cap:
            # no copy of the history: the same buffer is written in place
            assert cache.keys[0].data_ptr() == ptr, f"buffer moved at length {cache.length} (capacity {cap})"
        elif grew_at is None:
            grew_at = cache.length
            assert cache.keys[0].shape[1] == 2 * cap
            ptr, cap = cache.keys[0].data_ptr(), cache.keys[0].shape[1]
    assert grew_at is not None and cache.length == 45
