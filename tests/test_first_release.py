"""Files of the first MiniMind2-V release (old key names, interleaved RoPE) load and compute the same.

The reference is the first release's forward pass written out in this test from upstream's
algorithm: `tok_embeddings`, `layers.N.attention.wq/wk/wv/wo`, `feed_forward.w1/w2/w3`, RoPE by
`view_as_complex` over interleaved pairs, GQA by repeating k/v heads, an additive causal mask.
Our model loads the same tensors through `load_upstream` and must give the same logits.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minimind_v.checkpoint import load_upstream
from minimind_v.config import LMConfig
from minimind_v.first_release import interleaved_to_half, is_first_release, to_current

H, KV, D, L, V, FFN = 4, 2, 32, 2, 97, 64


def first_release_state(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hd = D // H
    s = {"tok_embeddings.weight": torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5,
         "norm.weight": torch.rand(D, generator=g, dtype=torch.float64) + 0.5}
    for i in range(L):
        for name, shape in (("attention.wq", (H * hd, D)), ("attention.wk", (KV * hd, D)),
                            ("attention.wv", (KV * hd, D)), ("attention.wo", (D, H * hd)),
                            ("feed_forward.w1", (FFN, D)), ("feed_forward.w3", (FFN, D)),
                            ("feed_forward.w2", (D, FFN))):
            s[f"layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3
        for norm in ("attention_norm", "ffn_norm"):
            s[f"layers.{i}.{norm}.weight"] = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    s["output.weight"] = s["tok_embeddings.weight"]                # tied, as the release
    return s


def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def first_release_logits(s: dict, ids: torch.Tensor, theta: float = 1e6) -> torch.Tensor:
    """The first release's forward, plainly: ids (B, T) -> logits (B, T, V)."""
    B, T = ids.shape
    hd = D // H
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))          # (hd/2,)
    pos_cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64),
                          torch.outer(torch.arange(T, dtype=torch.float64), freqs))      # (T, hd/2) complex

    def rotate(x):                                                   # (B, T, h, hd), pairs (2i, 2i+1)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * pos_cis[None, :, None, :]).flatten(3)

    h = s["tok_embeddings.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(L):
        p = f"layers.{i}."
        x = rms(h, s[p + "attention_norm.weight"])
        q = (x @ s[p + "attention.wq.weight"].T).view(B, T, H, hd)
        k = (x @ s[p + "attention.wk.weight"].T).view(B, T, KV, hd)
        v = (x @ s[p + "attention.wv.weight"].T).view(B, T, KV, hd)
        q, k = rotate(q), rotate(k)
        k, v = (t.repeat_interleave(H // KV, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                                 # (B, H, T, hd)
        att = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd) + mask, dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(B, T, D) @ s[p + "attention.wo.weight"].T
        x = rms(h, s[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ s[p + "feed_forward.w1.weight"].T) * (x @ s[p + "feed_forward.w3.weight"].T)) \
            @ s[p + "feed_forward.w2.weight"].T
    return rms(h, s["norm.weight"]) @ s["output.weight"].T


def test_first_release_file_gives_the_same_logits():
    state = first_release_state()
    assert is_first_release(state)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    want = first_release_logits(state, ids)
    model = load_upstream(state, LMConfig(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=KV,
                                          intermediate_size=FFN, max_seq_len=64)).double().eval()
    got = model(ids)
    assert want.abs().max() > 1
    # our RoPE tables are float32 (as upstream's), so float64 logits agree to ~1e-5, not 1e-12
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_without_the_row_reordering_the_logits_differ():
    """The q/k reordering is what makes it exact: renaming alone gives other logits (the test can fail)."""
    state = first_release_state()
    renamed = to_current(state, H)
    hd = D // H
    for key in list(renamed):
        if key.endswith(("q_proj.weight", "k_proj.weight")):                   # undo the reordering
            order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
            inverse = torch.argsort(order)
            renamed[key] = renamed[key].view(-1, hd, D)[:, inverse].reshape(-1, D)
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    model = load_upstream(renamed, LMConfig(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=KV,
                                            intermediate_size=FFN, max_seq_len=64)).double().eval()
    assert (model(ids) - first_release_logits(state, ids)).abs().max() > 1e-3


def test_row_reordering_is_evens_then_odds_per_head():
    w = torch.arange(2 * 4 * 3, dtype=torch.float32).view(8, 3)          # 2 heads of hd 4, D 3
    out = interleaved_to_half(w, 4)
    assert out[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_import_detects_a_first_release_vlm_file():
    from minimind_v.upstream import detect

    state = first_release_state()
    state["vision_proj.vision_proj.0.weight"] = torch.zeros(D, 48)
    state["vision_proj.vision_proj.0.bias"] = torch.zeros(D)
    found = detect(state, "old.pth", num_heads=H)
    assert found["kind"] == "vlm" and found["num_layers"] == L and found["num_kv_heads"] == KV
    assert found["projector_in"] == 48 and found["intermediate_size"] == FFN
    with pytest.raises(ValueError, match="tok_embeddings"):
        to_current({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, 1, "bad.pth")
