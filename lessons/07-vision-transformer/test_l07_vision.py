"""Grades lessons/07-vision-transformer/exercise.py (or minimind_v with --reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimind_v.config import VisionConfig


def test_quick_gelu(ex):
    x = torch.linspace(-8, 8, 201, dtype=torch.float64)
    torch.testing.assert_close(ex.quick_gelu(x), x / (1 + torch.exp(-1.702 * x)),
                               msg="quick_gelu(x) is not x * sigmoid(1.702 x) (CLIP's activation, not the exact GELU)")
    # close to the exact GELU, but not equal: CLIP was trained with this one
    assert 0 < (ex.quick_gelu(x) - F.gelu(x)).abs().max() < 0.03


def test_patchify_then_linear_is_the_stride_p_conv(ex):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64)
    w = torch.randn(10, 3, 16, 16, dtype=torch.float64)                  # (D, C, p, p)
    patches = ex.patchify(x, 16)
    assert patches.shape == (2, 6, 3 * 16 * 16), f"patchify((2,3,48,32), 16) has shape {tuple(patches.shape)}, expected (2, 6, 768)"
    torch.testing.assert_close(patches[:, 1], x[:, :, 0:16, 16:32].reshape(2, -1), msg=(
        "patch 1 is not the top row's second patch, flattened as (channel, row, column): patches go row by row, "
        "each flattened channel first"))
    by_conv = F.conv2d(x, w, stride=16).flatten(2).transpose(1, 2)      # (B, 6, D)
    torch.testing.assert_close(patches @ w.reshape(10, -1).T, by_conv, msg="patchify(x) @ W^T is not the stride-16 conv")
    with pytest.raises(ValueError):
        ex.patchify(x, 20)


def test_attention(ex):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    out, probs = ex.attention(q, k, v, need_weights=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), msg=lambda m: (
        f"attention is not softmax(q k^T / sqrt(d)) v with the softmax over the keys (the last dim)\n{m}"))
    torch.testing.assert_close(probs, torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1),
                               msg="need_weights=True must return the (B, H, T, T) softmax probabilities")
    assert ex.attention(q, k, v)[1] is None, "need_weights=False returns (out, None)"


def test_vision_block_equals_torch_multihead_attention(ex):
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4,
                       intermediate_size=80)
    block = ex.VisionBlock(cfg).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    out, probs = block(x, need_weights=True)
    # the reference: torch's own multi-head attention with the same weights
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.weight.copy_(block.attn.out.weight)
        mha.out_proj.bias.copy_(block.attn.out.bias)
    h = F.layer_norm(x, (32,), block.ln_1.weight, block.ln_1.bias, 1e-5)
    a, ref_probs = mha(h, h, h, need_weights=True, average_attn_weights=False)
    ref = x + a
    h = F.layer_norm(ref, (32,), block.ln_2.weight, block.ln_2.bias, 1e-5)
    u = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    ref = ref + (u * torch.sigmoid(1.702 * u)) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    torch.testing.assert_close(out, ref, msg=lambda m: (
        "VisionBlock differs from x + MHA(ln_1(x)), then + mlp(ln_2(.)) (pre-LN; qkv rows are W_q, W_k, W_v; "
        f"heads split as (B, T, H, d))\n{m}"))
    torch.testing.assert_close(probs, ref_probs, msg="the attention probabilities differ from torch's MultiheadAttention")


def _image(mode, w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.clip(np.stack([xx * 2.0, yy * 3.0, (xx + yy) * 1.0], -1) % 256
                  + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)]))
    return img.convert(mode)


def test_preprocess_equals_clip_image_processor(ex):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    proc = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    for i, (mode, w, h) in enumerate([("RGB", 150, 97), ("RGBA", 80, 200), ("L", 64, 64), ("CMYK", 65, 300)]):
        image = _image(mode, w, h, i)
        ours = ex.preprocess(image, size=64)
        ref = torch.from_numpy(np.asarray(proc(images=image, return_tensors="np")["pixel_values"])[0])
        assert ours.shape == (3, 64, 64) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=lambda m, mode=mode, w=w, h=h: (
            f"a {mode} {w}x{h} image: not CLIP's preprocessing (RGB, bicubic resize of the short side, center crop, "
            f"/255, mean/std)\n{m}"))
    white = ex.preprocess(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), size=8)    # transparent -> white
    expected = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(white[:, 4, 4], expected,
                               msg="a transparent image must come out white: composite RGBA onto white before RGB")
