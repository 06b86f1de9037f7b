"""The static-cache decode step equals the eager cached step; compiled greedy decoding gives the
same tokens as the eager path and as transformers' `generate`."""
from __future__ import annotations

import pytest
import torch

from minimind_v.attention import KVCache
from minimind_v.config import LMConfig
from minimind_v.generate import generate
from minimind_v.lm import MiniMindLM
from minimind_v.static_decode import StaticKVCache, decode_step, static_slots

TINY = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=96)


def peaked(cfg: LMConfig, seed: int = 0) -> MiniMindLM:
    """Random weights large enough for prompt-dependent, non-constant greedy tokens."""
    torch.manual_seed(seed)
    m = MiniMindLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


def left_padded(lengths, T, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return ids * mask, mask


@pytest.mark.parametrize("qk_norm", [False, True])
def test_decode_step_equals_the_eager_cached_step(qk_norm):
    model = peaked(LMConfig(**TINY, qk_norm=qk_norm))
    ids, mask = left_padded([5, 9, 7], T=9)
    cache = KVCache()
    with torch.no_grad():
        model(ids, kv_cache=cache, attention_mask=mask)
        static = StaticKVCache(2, 3, 32, 2, 16)
        for buf in static.keys + static.values:          # garbage in the slots not yet written
            buf.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(9))
        static.fill(cache, mask)
        g = torch.Generator().manual_seed(4)
        for pos in range(9, 15):
            nxt = torch.randint(0, TINY["vocab_size"], (3, 1), generator=g)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            ref = model(nxt, kv_cache=cache, attention_mask=mask)[:, -1]          # (B, V)
            got = decode_step(model, nxt, torch.tensor([pos]), static)
            assert ref.std() > 0.5
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            for layer in range(2):                                                 # written in place
                torch.testing.assert_close(static.keys[layer][:, :, :pos + 1],
                                           cache.keys[layer][:, :pos + 1].transpose(1, 2))


def test_static_length_is_a_multiple_of_the_block_within_the_context():
    assert static_slots(512, 256, 8192) == 768
    assert static_slots(513, 256, 8192) == 1024
    assert static_slots(10, 25, 96) == 96


def inductor_compiles() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(2)).eq(3).all())
    except Exception:              # no C++ compiler, unsupported platform, ...
        return False


needs_inductor = pytest.mark.skipif(not inductor_compiles(), reason="torch.compile (inductor) cannot compile here")


@needs_inductor
def test_compiled_greedy_equals_eager_and_transformers():
    transformers = pytest.importorskip("transformers")
    from minimind_v.checkpoint import load_upstream
    cfg = LMConfig(**TINY)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True)).eval()
    with torch.no_grad():                                  # peaked random weights, as `peaked`
        for p in hf.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model = load_upstream(hf.state_dict(), cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    eager = generate(model, ids, 30)
    compiled = generate(model, ids, 30, compile=True)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    assert len(set(eager[0, 12:].tolist())) > 3                    # not a degenerate constant
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled, ref)
    # a left-padded batch: each row as the eager path decodes it
    ids, mask = left_padded([5, 12], T=12)
    assert torch.equal(generate(model, ids, 20, attention_mask=mask, compile=True),
                       generate(model, ids, 20, attention_mask=mask))



@needs_inductor
def test_compiled_decoding_of_a_vlm_after_an_image_prefill():
    """The images enter at prefill (eager); the compiled steps continue from the copied cache."""
    from minimind_v.config import VisionConfig, VLMConfig
    from minimind_v.vlm import MiniMindVLM
    pad, patches = 5, 4
    cfg = VLMConfig(lm=LMConfig(**TINY), image_pad_id=pad, num_patches=patches,
                    vision=VisionConfig(image_size=32, patch_size=16, hidden_size=64, num_layers=1, num_heads=4,
                                        intermediate_size=128, projection_dim=64))
    torch.manual_seed(0)
    model = MiniMindVLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    ids = torch.tensor([[1, 2] + [pad] * patches + [3, 4, 6], [8] + [pad] * patches + [9, 10, 11, 12]])
    pixels = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager = generate(model, ids, 15, images=pixels)
    assert torch.equal(generate(model, ids, 15, images=pixels, compile=True), eager)
    assert not torch.equal(generate(model, ids, 15), eager)          # the images matter
