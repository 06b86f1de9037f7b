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
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    ref = F.linear(F.silu(F.linear(x, ffn.gate_proj.weight)) * F.linear(x, ffn.up_proj.weight), ffn.down_proj.weight)
    assert ffn.gate_proj.weight.shape == (40, 16) and ffn.down_proj.weight.shape == (16, 40), \
        "gate_proj/up_proj map hidden -> intermediate (weight (F, D)), down_proj intermediate -> hidden"
    assert ffn.gate_proj.bias is None and ffn.up_proj.bias is None and ffn.down_proj.bias is None, \
        "the three Linear layers of SwiGLU have no bias (bias=False)"
    torch.testing.assert_close(ffn(x), ref, msg=lambda m: (
        f"SwiGLU(x) is not down(silu(gate(x)) * up(x)): silu goes on the gate, not on up\n{m}"))


def test_block_is_pre_norm_residual(ex):
    cfg = LMConfig(**TINY)
    block = ex.Block(cfg, 0).eval()
    _randomize(block, 1)
    h = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(cfg.head_dim, 6)
    mask = build_mask(6, 6, None)
    mid = h + block.attn(block.attn_norm(h), cos, sin, mask)
    ref = mid + block.ffn(block.ffn_norm(mid))
    torch.testing.assert_close(block(h, cos, sin, mask), ref, msg=lambda m: (
        "Block(h) is not h + attn(attn_norm(h)), then + ffn(ffn_norm(.)): pre-norm (normalise each sub-layer's input, "
        f"add its output to the unnormalised h), each norm its own\n{m}"))
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
    ids = torch.randint(0, 89, (2, 21), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        logits = model(ids)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"logits differ from LlamaForCausalLM with the same weights\n{m}")
    torch.testing.assert_close(ex.lm_loss(logits, labels), ref.loss, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"lm_loss differs from LlamaForCausalLM's loss\n{m}")


def test_default_size_and_cached_forward(ex):
    model = ex.MiniMindLM(LMConfig())
    n = sum(p.numel() for p in model.parameters())
    assert n == 25_829_888, f"{n:,} parameters, expected 25,829,888 (is lm_head tied to embed_tokens? no biases?)"
    small = ex.MiniMindLM(LMConfig(**TINY)).eval()
    _randomize(small, 3)
    ids = torch.randint(0, 89, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = small(ids)
        cache = KVCache()
        parts = [small(ids[:, :6], kv_cache=cache)] + [small(ids[:, t:t + 1], kv_cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5, msg=lambda m: (
        "prefill 6 tokens + 4 one-token steps with a KVCache differ from one full forward: the new tokens sit at "
        f"positions past..past+T-1 (cos/sin rows and the mask start at past = kv_cache.length)\n{m}"))


def test_loss_by_hand(ex):
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([[1, 2, -100, 3], [-100, 4, 5, 6]])
    pairs = [(0, 0, 2), (0, 2, 3), (1, 0, 4), (1, 1, 5), (1, 2, 6)]   # (row, position, target)
    ref = torch.stack([F.cross_entropy(logits[b, t], torch.tensor(y)) for b, t, y in pairs]).mean()
    torch.testing.assert_close(ex.lm_loss(logits, labels), ref, msg=lambda m: (
        "the loss is not the mean over the 5 counted pairs: position t predicts labels[t+1] (shift by one), "
        f"-100 labels are skipped and not counted in the mean\n{m}"))


def test_loss_of_bf16_logits_in_float32(ex):
    logits = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(5)).bfloat16()
    labels = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(6))
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1))
    loss = ex.lm_loss(logits, labels)
    torch.testing.assert_close(loss.float(), ref, rtol=1e-6, atol=1e-6, msg=lambda m: (
        f"bfloat16 logits: the loss must be computed in float32 (logits.float() first)\n{m}"))
