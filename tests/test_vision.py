"""Our ViT equals transformers' CLIP vision tower at the same (random) weights.

Each model is saved with `save_pretrained` and loaded through `load_clip_vision`, so these tests
cover the Hugging Face loading path too. Compared: the last hidden state (before the final
LayerNorm, what MiniMind-V uses), the post-LN pooled output, and the projected image embeds.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minimind_v.clip_weights import load_clip_vision
from minimind_v.config import VisionConfig
from minimind_v.vision import CLIPVisionTransformer, attention, patchify, quick_gelu

transformers = pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            image_size=48, patch_size=16, projection_dim=24)


def hf_model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(CLIPVisionConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():   # random LN params / biases too, so no parameter is a trivial 0 or 1
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_tiny_with_projection_equals_transformers(tmp_path):
    ref = hf_model(CLIPVisionModelWithProjection)
    ref.save_pretrained(tmp_path)
    ours, cfg = load_clip_vision(tmp_path)
    assert cfg == VisionConfig(image_size=48, patch_size=16, hidden_size=64, num_layers=3, num_heads=4,
                               intermediate_size=160, projection_dim=24)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        out = ref(pixel_values=x)
        vm = ref.vision_model(pixel_values=x)
        hidden = ours(x)
        assert hidden.shape == (3, 1 + 9, 64)
        assert hidden.std() > 0.1
        torch.testing.assert_close(hidden, vm.last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.pooled_output(x), vm.pooler_output, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.image_embeds(x), out.image_embeds, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.patch_features(x), hidden[:, 1:, :])


def test_tiny_without_projection(tmp_path):
    ref = hf_model(CLIPVisionModel, seed=1, num_attention_heads=8)   # heads from config.json
    ref.save_pretrained(tmp_path)
    ours, cfg = load_clip_vision(tmp_path / "model.safetensors")
    assert cfg.num_heads == 8 and ours.proj is None
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = ref(pixel_values=x)
        torch.testing.assert_close(ours(x), out.last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.pooled_output(x), out.pooler_output, rtol=0, atol=1e-4)
    with pytest.raises(RuntimeError, match="no projection"):
        ours.image_embeds(x)


def test_full_vit_b16_equals_transformers(tmp_path):
    """The real size (86M parameters, random init), batch 1: the output MiniMind-V uses is (1, 196, 768)."""
    torch.manual_seed(0)
    ref = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=16, projection_dim=512)).eval()
    ref.save_pretrained(tmp_path)
    ours, cfg = load_clip_vision(tmp_path)
    assert cfg == VisionConfig()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        hidden = ours(x)
        assert hidden[:, 1:, :].shape == (1, 196, 768)          # = ours.patch_features(x)
        torch.testing.assert_close(hidden, out.last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.ln_post(hidden[:, 0]), ref.vision_model.post_layernorm(
            out.last_hidden_state[:, 0]), rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.proj(ours.ln_post(hidden[:, 0])), out.image_embeds, rtol=0, atol=1e-4)


def test_sdpa_fast_path_equals_manual():
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=3,
                       intermediate_size=96, projection_dim=8)
    manual = CLIPVisionTransformer(cfg).eval()
    fast = CLIPVisionTransformer(cfg, attn_impl="sdpa").eval()
    fast.load_state_dict(manual.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), manual(x), rtol=0, atol=1e-5)


def test_attention_equals_sdpa_and_rows_sum_to_one():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=torch.float64) for _ in range(3))
    out, probs = attention(q, k, v, need_weights=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 7, dtype=torch.float64))


def test_quick_gelu():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(quick_gelu(x), x / (1 + torch.exp(-1.702 * x)))
    from transformers.activations import ACT2FN
    torch.testing.assert_close(quick_gelu(x), ACT2FN["quick_gelu"](x))


def test_folded_mlp_equals_plain_quick_gelu_mlp_with_grads():
    from minimind_v.vision import VisionMLP
    torch.manual_seed(0)
    mlp = VisionMLP(VisionConfig(hidden_size=32, num_heads=2, intermediate_size=128)).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)                       # activations well into both tails of quick_gelu
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    out, plain = mlp(x), mlp.forward_plain(x)
    assert out.shape == (2, 5, 32) and plain.abs().max() > 1
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), [x, *mlp.parameters()])
    g_plain = torch.autograd.grad((plain * w).sum(), [x, *mlp.parameters()])
    for a, b in zip(g, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_conv_patch_embedding_is_patchify_then_linear():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 20, kernel_size=8, stride=8, bias=False).double()
    x = torch.randn(2, 3, 32, 24, dtype=torch.float64)
    by_conv = conv(x).flatten(2).transpose(1, 2)                      # (B, 12, 20)
    by_linear = patchify(x, 8) @ conv.weight.reshape(20, -1).T        # (B, 12, 20)
    torch.testing.assert_close(by_linear, by_conv)
    # patch 1 (second in row-major order) is the 8x8 window at rows 0..7, cols 8..15
    torch.testing.assert_close(patchify(x, 8)[:, 1], x[:, :, 0:8, 8:16].reshape(2, -1))


def test_attention_maps_and_bad_pixels():
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, projection_dim=8)
    model = CLIPVisionTransformer(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hidden, attns = model.encode(x, need_weights=True)
    assert len(attns) == 2 and attns[0].shape == (1, 2, 17, 17)
    torch.testing.assert_close(hidden, model(x))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model(torch.randn(1, 3, 48, 48))
    assert math.isclose(attns[1].sum().item(), 2 * 17, rel_tol=1e-5)
