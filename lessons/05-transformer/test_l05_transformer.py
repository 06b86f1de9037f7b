"""Grades lesson 05 against formulas and against transformers' LlamaForCausalLM."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.attention import KVCache, build_mask
from minimind_v.checkpoint import translate_upstream
from minimind_v.config import LMConfig
from minimind_v.rope import rope_tables

TINY = dict(vocab_size=89, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)


def _randomize(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)


def test_swiglu(ex):
    ffn = ex.SwiGLU(16, 40)
    _randomize(ffn, 0)
    x = torch.randn(2, 5, 16)
    ref = F.linear(F.silu(F.linear(x, ffn.gate_proj.weight)) * F.linear(x, ffn.up_proj.weight), ffn.down_proj.weight)
    assert ffn.gate_proj.weight.shape == (40, 16) and ffn.down_proj.weight.shape == (16, 40)
    assert ffn.gate_proj.bias is None
    torch.testing.assert_close(ffn(x), ref)


def test_block_is_pre_norm_residual(ex):
    cfg = LMConfig(**TINY)
    block = ex.Block(cfg, 0).eval()
    _randomize(block, 1)
    h = torch.randn(2, 6, 32)
    cos, sin = rope_tables(cfg.head_dim, 6)
    mask = build_mask(6, 6, None)
    mid = h + block.attn(block.attn_norm(h), cos, sin, mask)
    ref = mid + block.ffn(block.ffn_norm(mid))
    torch.testing.assert_close(block(h, cos, sin, mask), ref)
    assert not torch.allclose(ref, h + block.ffn(block.ffn_norm(h)))   # attention matters


@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_loss_equal_llama(ex, tied):
    transformers = pytest.importorskip("transformers")
    cfg = LMConfig(**TINY, tie_word_embeddings=tied)
    hcfg = transformers.LlamaConfig(
        vocab_size=89, hidden_size=32, intermediate_size=cfg.intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    _randomize(hf, 2)
    ours, unknown = translate_upstream(hf.state_dict())
    assert not unknown
    model = ex.MiniMindLM(cfg).eval()
    model.load_state_dict(ours)
    if tied:
        assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 89, (2, 21))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        logits = model(ids)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ex.lm_loss(logits, labels), ref.loss, rtol=1e-5, atol=1e-5)


def test_default_size_and_cached_forward(ex):
    model = ex.MiniMindLM(LMConfig())
    assert sum(p.numel() for p in model.parameters()) == 25_829_888
    small = ex.MiniMindLM(LMConfig(**TINY)).eval()
    _randomize(small, 3)
    ids = torch.randint(0, 89, (2, 10))
    with torch.no_grad():
        full = small(ids)
        cache = KVCache()
        parts = [small(ids[:, :6], kv_cache=cache)] + [small(ids[:, t:t + 1], kv_cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_loss_by_hand(ex):
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, -100, 3], [-100, 4, 5, 6]])
    pairs = [(0, 0, 2), (0, 2, 3), (1, 0, 4), (1, 1, 5), (1, 2, 6)]   # (row, position, target)
    ref = torch.stack([F.cross_entropy(logits[b, t], torch.tensor(y)) for b, t, y in pairs]).mean()
    torch.testing.assert_close(ex.lm_loss(logits, labels), ref)
