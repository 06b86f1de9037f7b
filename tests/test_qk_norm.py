"""minimind-3v's attention: per-head q/k RMSNorm and an explicit head_dim equal transformers' Qwen3
(the same computation, and the same key names as upstream's files); YaRN tables equal upstream's
formula written as a plain loop; with qk_norm off nothing changes."""
from __future__ import annotations

import math

import pytest
import torch

from minimind_v.attention import KVCache, causal_attend_blocked
from minimind_v.checkpoint import load_upstream
from minimind_v.config import LMConfig
from minimind_v.lm import MiniMindLM, rope_tables_for
from minimind_v.norm import rms_norm
from minimind_v.rope import apply_rope, rope_tables

transformers = pytest.importorskip("transformers")

# head_dim 24 != hidden / heads = 16: the projections are (64 -> 96) and (96 -> 64)
TINY = dict(vocab_size=101, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24,
            intermediate_size=96, rms_norm_eps=1e-6, max_seq_len=128, qk_norm=True)


def random_qwen3(cfg: LMConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, hidden_act="silu", use_sliding_window=False)).eval()
    with torch.no_grad():                       # norm weights far from 1, so a skipped norm shows
        for p in hf.parameters():
            p.uniform_(0.3, 2.0) if p.dim() == 1 else p.normal_(0.0, 0.08)
    return hf


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_logits_equal_qwen3(impl):
    cfg = LMConfig(**TINY, attn_impl=impl)
    hf = random_qwen3(cfg)
    sd = hf.state_dict()
    assert "model.layers.0.self_attn.q_norm.weight" in sd        # upstream minimind-3v's names, too
    ours = load_upstream(sd, cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert ref.std() > 0.5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the q/k-norm is not decoration: the same weights without it are far off
    plain = load_upstream({k: v for k, v in sd.items() if "_norm." not in k or "layernorm" in k},
                          LMConfig(**{**TINY, "qk_norm": False})).eval()
    with torch.no_grad():
        assert (plain(ids) - ref).abs().max() > 0.1


def test_cached_decoding_with_qk_norm_equals_full_forward():
    cfg = LMConfig(**TINY)
    ours = load_upstream(random_qwen3(cfg, seed=2).state_dict(), cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache()
        steps = [ours(ids[:, :7], kv_cache=cache)] + [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_norm_is_per_head_and_before_rope():
    """The two plausible mistakes, normalising after RoPE or over all heads at once, give other q."""
    cfg = LMConfig(**TINY)
    model = load_upstream(random_qwen3(cfg).state_dict(), cfg).eval()
    attn = model.layers[0].attn
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(4))
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    q = attn.q_proj(x).view(1, 9, 4, 24)
    k = attn.k_proj(x).view(1, 9, 2, 24)
    v = attn.v_proj(x).view(1, 9, 2, 24)
    eps = cfg.rms_norm_eps
    qr, kr = apply_rope(rms_norm(q, attn.q_norm.weight, eps), rms_norm(k, attn.k_norm.weight, eps), cos, sin)
    want = attn.o_proj(causal_attend_blocked(qr, kr, v).reshape(1, 9, 96))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, None), want, rtol=1e-6, atol=1e-6)
        after = apply_rope(q, k, cos, sin)
        after = (rms_norm(after[0], attn.q_norm.weight, eps), rms_norm(after[1], attn.k_norm.weight, eps))
        assert (after[0] - qr).abs().max() > 1e-2
        whole = rms_norm(q.reshape(1, 9, 96), attn.q_norm.weight.repeat(4), eps).view(1, 9, 4, 24)
        assert (apply_rope(whole, kr, cos, sin)[0] - qr).abs().max() > 1e-2


def test_qk_norm_off_changes_nothing():
    """The MiniMind2-V paths: no q_norm/k_norm parameters, and the layer is q/k/v -> RoPE -> attention."""
    cfg = LMConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)
    assert cfg.head_dim == 8 and not cfg.qk_norm
    torch.manual_seed(0)
    model = MiniMindLM(cfg).eval()
    assert not any("q_norm" in k or "k_norm" in k for k in model.state_dict())
    attn = model.layers[0].attn
    x = torch.randn(2, 11, 32)
    cos, sin = model.rope_cos[:11], model.rope_sin[:11]
    q, k = apply_rope(attn.q_proj(x).view(2, 11, 4, 8), attn.k_proj(x).view(2, 11, 2, 8), cos, sin)
    want = attn.o_proj(causal_attend_blocked(q, k, attn.v_proj(x).view(2, 11, 2, 8)).reshape(2, 11, 32))
    with torch.no_grad():
        assert torch.equal(attn(x, cos, sin, None), want)
    assert LMConfig().head_dim == 64 and LMConfig().to_dict()["head_dim"] == 64


def upstream_yarn_tables(dim, end, base, sc):
    """Upstream MiniMind's YaRN rule written as a loop over frequency pairs (float64)."""
    orig, factor = sc.get("original_max_position_embeddings", 2048), sc.get("factor", 16)
    fast, slow, a = sc.get("beta_fast", 32.0), sc.get("beta_slow", 1.0), sc.get("attention_factor", 1.0)
    inv_dim = lambda b: (dim * math.log(orig / (b * 2 * math.pi))) / (2 * math.log(base))  # noqa: E731
    low, high = max(math.floor(inv_dim(fast)), 0), min(math.ceil(inv_dim(slow)), dim // 2 - 1)
    freqs = []
    for i in range(dim // 2):
        f = 1.0 / base ** (2 * i / dim)
        if end / orig > 1.0:
            r = min(max((i - low) / max(high - low, 0.001), 0.0), 1.0)
            f = f * (1 - r + r / factor)
        freqs.append(f)
    cos = torch.tensor([[math.cos(t * f) for f in freqs] * 2 for t in range(end)], dtype=torch.float64) * a
    sin = torch.tensor([[math.sin(t * f) for f in freqs] * 2 for t in range(end)], dtype=torch.float64) * a
    return cos, sin


@pytest.mark.parametrize("sc", [dict(factor=16, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                                     attention_factor=1.0, type="yarn"),
                                dict(factor=4, original_max_position_embeddings=32, attention_factor=1.3)])
def test_yarn_tables_equal_upstreams_rule(sc):
    cfg = LMConfig(**{**TINY, "rope_scaling": sc, "max_seq_len": 256})
    cos, sin = rope_tables_for(cfg)
    ref_cos, ref_sin = upstream_yarn_tables(24, 256, cfg.rope_theta, sc)
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), ref_sin, rtol=0, atol=1e-6)
    plain_cos, _ = rope_tables(24, 256, cfg.rope_theta)
    assert (cos - plain_cos).abs().max() > 0.1                    # the scaling did something
    # within the original context nothing is scaled (only the attention factor applies)
    short = LMConfig(**{**TINY, "rope_scaling": sc, "max_seq_len": sc["original_max_position_embeddings"]})
    torch.testing.assert_close(rope_tables_for(short)[0], rope_tables(24, short.max_seq_len, 1e6)[0]
                               * sc.get("attention_factor", 1.0), rtol=0, atol=1e-6)
    assert rope_tables_for(LMConfig(**TINY))[0].equal(rope_tables(24, 128, 1e6)[0])
