"""The fast paths compute what the plain ones do.

- `linear_cross_entropy` (the loss of h @ W^T chunk by chunk, never holding all logits) equals
  `F.cross_entropy` on the full logits, loss and gradients, with ignored rows, chunks that do not
  divide the rows, a scaled backward, and under bf16 autocast within bf16's rounding.
- `cross_entropy` (what `lm_loss` runs: the logits read chunk by chunk in float32, the gradient
  written in their own dtype) equals `F.cross_entropy(logits.float(), ...)`, loss and gradients,
  in float64, float32 and bf16, and leaves the logits untouched.
- `chunked_lm_loss(model, ids, labels)` equals `lm_loss(model(ids), labels)` with the model's gradients.
- `logits_at` given as flat int64 indices equals the boolean mask, and the model traces without a
  graph break under `torch.compile(fullgraph=True)`.
- With `logits_at`, the last block's FFN runs on those rows only, with the full forward's logits and
  gradients (padding, a KV cache); a block class of its own (a lesson's, a variant) runs in full.
- The fused AdamW that `train.py` uses follows the plain for-loop AdamW.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.config import LMConfig
from minimind_v.lm import (MiniMindLM, chunked_lm_loss, cross_entropy, linear_cross_entropy, lm_loss,
                           loss_positions, next_token_targets)

TINY = dict(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)


def _inputs(N=37, D=24, V=53, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100                                          # rows that take no loss
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 8, 16, 37, 512])
def test_linear_cross_entropy_equals_cross_entropy_with_grads(chunk):
    h, w, t = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(h1 @ w1.t(), t)
    (2.5 * ref).backward()                                 # a scaled upstream gradient reaches both
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(h2, w2, t, chunk_size=chunk)
    (2.5 * out).backward()
    assert ref.item() > 1.0
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert h1.grad[t == -100].abs().max() == 0 and h2.grad[t == -100].abs().max() == 0
    assert h1.grad.abs().max() > 1e-3
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_float32_and_all_ignored():
    h, w, t = _inputs(N=300, dtype=torch.float32, seed=1)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy(h1 @ w1.t(), t).backward()
    linear_cross_entropy(h2, w2, t, chunk_size=64).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)
    none = torch.full_like(t, -100)                        # no counted row: nan, as F.cross_entropy
    assert F.cross_entropy(h @ w.t(), none).isnan() and linear_cross_entropy(h, w, none).isnan()


def test_linear_cross_entropy_under_bf16_autocast_is_close():
    h, w, t = _inputs(N=200, D=64, V=300, dtype=torch.float32, seed=2)
    grads = []
    for fn in (lambda a, b: F.cross_entropy(F.linear(a, b).float(), t),
               lambda a, b: linear_cross_entropy(a, b, t, chunk_size=48)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(a, b)
        loss.backward()
        assert loss.dtype == torch.float32 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
        grads.append((loss.detach(), a.grad, b.grad))
    (l1, a1, b1), (l2, a2, b2) = grads
    torch.testing.assert_close(l2, l1, rtol=2e-3, atol=2e-3)
    for x, y in ((a2, a1), (b2, b1)):                      # bf16 products: ~3 significant digits
        assert (x - y).abs().max() <= 2e-2 * y.abs().max()


@pytest.mark.parametrize("chunk", [1, 7, 64, 512])
def test_cross_entropy_equals_f_cross_entropy_in_float64(chunk):
    h, w, t = _inputs(N=41)
    logits = (h @ w.t()) * 3                               # (41, 53), confident rows too
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = F.cross_entropy(a, t)
    (2.5 * ref).backward()                                 # a scaled upstream gradient
    out = cross_entropy(b, t, chunk_size=chunk)
    (2.5 * out).backward()
    assert out.dtype == torch.float64 and ref.item() > 1.0
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert b.grad[t == -100].abs().max() == 0 and b.grad.abs().max() > 1e-3
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.detach(), logits, rtol=0, atol=0)     # the logits are not written to


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_of_float32_and_bf16_logits_equals_the_float32_statement(dtype):
    h, w, t = _inputs(N=300, D=32, V=400, dtype=torch.float32, seed=3)
    logits = (h @ w.t() * 2).to(dtype)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = F.cross_entropy(a.float(), t)                    # lm_loss's former statement
    ref.backward()
    out = cross_entropy(b, t, chunk_size=64)
    out.backward()
    assert out.dtype == torch.float32 and b.grad.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # bf16: both round the same float32 numbers, so at most one bf16 step (2^-7) apart
    rtol, atol = (1e-6, 1e-9) if dtype == torch.float32 else (8e-3, 1e-8)
    torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=rtol, atol=atol)
    assert torch.equal(b.detach(), logits)
    none = torch.full_like(t, -100)                        # no counted row: nan, as F.cross_entropy
    assert F.cross_entropy(logits.float(), none).isnan() and cross_entropy(logits, none).isnan()


def test_chunked_lm_loss_equals_lm_loss_with_model_grads():
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**TINY)).double()
    ids = torch.randint(0, 101, (3, 20))
    labels = ids.clone()
    labels[0, :6] = -100
    params = list(model.parameters())
    # lm_loss's own arithmetic in float64
    ref = F.cross_entropy(model(ids).reshape(-1, 101), next_token_targets(labels).reshape(-1))
    g_ref = torch.autograd.grad(ref, params)
    out = chunked_lm_loss(model, ids, labels, chunk_size=16)
    g_out = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, lm_loss(model(ids), labels), rtol=1e-12, atol=1e-12)
    for a, b in zip(g_out, g_ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_logits_at_indices_equal_the_boolean_mask_and_compile_fullgraph():
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**TINY))
    ids = torch.randint(0, 101, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 3:7] = ids[0, 3:7]
    labels[1, 9:] = ids[1, 9:]
    mask, targets = loss_positions(labels)
    index = mask.flatten().nonzero()[:, 0]                 # (K,) row-major flat positions
    by_mask, by_index = model(ids, logits_at=mask), model(ids, logits_at=index)
    assert by_index.shape == (7, 101)
    torch.testing.assert_close(by_index, by_mask, rtol=0, atol=0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, logits_at=index), by_mask, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def _rows_case(seed=0):
    torch.manual_seed(seed)
    model = MiniMindLM(LMConfig(**TINY)).double()
    ids = torch.randint(0, 101, (3, 14))
    labels = torch.full_like(ids, -100)
    labels[0, 4:8] = ids[0, 4:8]
    labels[1, 12:] = ids[1, 12:]
    labels[2, 1] = ids[2, 1]
    return model, ids, labels


def test_the_last_block_runs_its_ffn_on_the_loss_rows_only():
    model, ids, labels = _rows_case()
    mask, targets = loss_positions(labels)
    seen = []
    for block in model.layers:
        block.ffn.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    logits = model(ids, logits_at=mask)                          # (K, V), K = 4 + 2 + 1
    assert seen == [(3, 14, 64), (1, 7, 64)]                     # the last FFN saw the 7 rows alone
    full = model(ids)                                            # (B, T, V), every block in full
    torch.testing.assert_close(logits, full[mask], rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    g_rows = torch.autograd.grad(F.cross_entropy(logits, targets), params)
    g_full = torch.autograd.grad(F.cross_entropy(full[mask], targets), params)   # lm_loss in float64
    for a, b in zip(g_rows, g_full):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_rows_path_keeps_padding_and_the_kv_cache():
    from minimind_v.attention import KVCache
    model, ids, _ = _rows_case()
    pad = torch.ones_like(ids)
    pad[1, :3] = 0                                               # a left-padded row
    last = torch.tensor([13, 27, 41])                            # each row's last position
    with torch.no_grad():
        cache_rows, cache_full = KVCache(), KVCache()
        by_rows = model(ids, kv_cache=cache_rows, attention_mask=pad, logits_at=last)
        full = model(ids, kv_cache=cache_full, attention_mask=pad)
        torch.testing.assert_close(by_rows, full.reshape(42, -1)[last], rtol=1e-12, atol=1e-12)
        for a, b in zip(cache_rows.keys + cache_rows.values, cache_full.keys + cache_full.values):
            torch.testing.assert_close(a[:, :14], b[:, :14], rtol=0, atol=0)     # every position cached


def test_a_block_of_its_own_runs_in_full_before_the_rows_are_taken():
    from minimind_v import lm

    class PostNorm(lm.Block):                                    # a variant: forward of its own
        def forward(self, h, cos, sin, mask, kv_cache=None):
            h = self.attn_norm(h + self.attn(h, cos, sin, mask, kv_cache))
            return self.ffn_norm(h + self.ffn(h))

    model, ids, labels = _rows_case()
    mask, _ = loss_positions(labels)
    cfg = model.cfg
    model.layers = torch.nn.ModuleList(PostNorm(cfg, i) for i in range(cfg.num_layers)).double()
    torch.testing.assert_close(model(ids, logits_at=mask), model(ids)[mask], rtol=1e-12, atol=1e-12)


def test_fused_adamw_follows_the_for_loop_adamw():
    torch.manual_seed(0)
    a = MiniMindLM(LMConfig(**TINY))
    b = MiniMindLM(LMConfig(**TINY))
    b.load_state_dict(a.state_dict())
    init = {k: v.clone() for k, v in a.state_dict().items()}
    ids = torch.randint(0, 101, (2, 16))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kw)
            for m, kw in ((a, dict(foreach=False)), (b, dict(fused=True)))]
    for _ in range(3):
        for m, o in zip((a, b), opts):
            lm_loss(m(ids), ids).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    moved = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (p - init[name]).abs().max().item())
    assert moved > 1e-3
