"""MiniMindLM equals transformers' LlamaForCausalLM with the same random weights; size; loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.attention import KVCache
from minimind_v.checkpoint import load_upstream
from minimind_v.config import LMConfig
from minimind_v.lm import MiniMindLM, count_parameters, lm_loss

transformers = pytest.importorskip("transformers")


def hf_config(cfg: LMConfig):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu")


def random_llama(cfg: LMConfig, seed: int = 0):
    """A Llama with non-trivial random weights (norm weights too, not ones)."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return hf


TINY = dict(vocab_size=101, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=128)


@pytest.mark.parametrize("tied,impl", [(True, "manual"), (False, "manual"), (True, "sdpa")])
def test_logits_equal_llama(tied, impl):
    cfg = LMConfig(**TINY, tie_word_embeddings=tied, attn_impl=impl)
    hf = random_llama(cfg)
    ours = load_upstream(hf.state_dict(), cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert ref.std() > 0.5                      # non-trivial logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_loss_equals_llama_loss():
    cfg = LMConfig(**TINY)
    hf = random_llama(cfg, seed=1)
    ours = load_upstream(hf.state_dict(), cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :7] = -100                        # e.g. prompt tokens that are not trained on
    labels[1, 15:] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels).loss
        out = lm_loss(ours(ids), labels)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and by hand: position t predicts label t+1, -100 ignored
    logits = ours(ids).detach()
    keep = labels[:, 1:] != -100
    manual = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(out, manual, rtol=1e-6, atol=1e-6)


def test_default_model_has_25_829_888_parameters_like_llama():
    cfg = LMConfig()
    assert cfg.intermediate_size == 1408
    assert count_parameters(MiniMindLM(cfg)) == 25_829_888
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config(cfg))
    assert sum(p.numel() for p in hf.parameters()) == 25_829_888


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_cached_decoding_equals_full_forward_at_every_step(impl):
    cfg = LMConfig(**TINY, attn_impl=impl)
    torch.manual_seed(0)
    model = MiniMindLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        steps = [model(ids[:, :8], kv_cache=cache), model(ids[:, 8:12], kv_cache=cache)]   # a chunk after a cache
        for t in range(12, 30):
            steps.append(model(ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 30


def test_embed_then_forward_embeds_equals_forward():
    cfg = LMConfig(**TINY)
    model = MiniMindLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.forward_embeds(model.embed(ids)), model(ids))


def test_context_limit_is_enforced():
    cfg = LMConfig(**{**TINY, "max_seq_len": 16})
    model = MiniMindLM(cfg)
    with pytest.raises(ValueError, match="17 tokens exceeds the context limit max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, cfg.vocab_size)


def test_tied_embeddings_share_storage_and_train():
    model = MiniMindLM(LMConfig(**TINY))
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 101, (2, 8))
    lm_loss(model(ids), ids).backward()
    assert model.embed_tokens.weight.grad is not None and model.embed_tokens.weight.grad.abs().sum() > 0


def test_logits_at_label_positions_gives_the_same_loss_and_grads():
    from minimind_v.lm import loss_positions
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**TINY)).double()
    ids = torch.randint(0, 101, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 5:9] = ids[0, 5:9]            # answer tokens in the middle of a row
    labels[1, 10:] = ids[1, 10:]            # at the end (the last position predicts nothing)
    labels[2, 1] = ids[2, 1]                # a single target
    full = lm_loss(model(ids), labels)
    g_full = torch.autograd.grad(full, list(model.parameters()))
    logits_at, targets = loss_positions(labels)
    assert logits_at.sum() == 4 + 2 + 1 and targets.tolist() == labels[labels != -100].tolist()
    logits = model(ids, logits_at=logits_at)
    assert logits.shape == (7, 101)
    part = F.cross_entropy(logits, targets)                  # lm_loss's arithmetic, here in float64
    g_part = torch.autograd.grad(part, list(model.parameters()))
    torch.testing.assert_close(part, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_part, g_full):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
