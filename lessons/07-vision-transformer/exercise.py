"""Lesson 07 exercises: the pieces of CLIP's vision transformer, and CLIP's preprocessing.

Run `pytest lessons/07-vision-transformer` to grade your code (`--reference` grades minimind_v).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from PIL import Image

REFERENCE = {
    "quick_gelu": "minimind_v.vision:quick_gelu",
    "patchify": "minimind_v.vision:patchify",
    "attention": "minimind_v.vision:attention",
    "VisionBlock": "minimind_v.vision:VisionBlock",
    "preprocess": "minimind_v.image:preprocess",
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, x * sigmoid(1.702 x). Any shape -> same shape."""
    raise NotImplementedError


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p): non-overlapping p x p patches in row-major order.

    Each patch is flattened in (channel, row, column) order, so that
    `patchify(x, p) @ conv.weight.reshape(D, -1).T` equals a p x p convolution with stride p.
    Raise ValueError if H or W is not a multiple of p.
    """
    raise NotImplementedError


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool = False):
    """softmax(Q K^T / sqrt(d)) V without a mask, written by hand (no scaled_dot_product_attention).

    q, k, v: (B, H, T, d). Returns (out (B, H, T, d), probs (B, H, T, T) if need_weights else None).
    """
    raise NotImplementedError


class VisionAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (rows of qkv.weight: W_q, W_k, W_v)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        """x (B, T, D) -> (out (B, T, D), probs (B, H, T, T) or None). Use your `attention`."""
        raise NotImplementedError


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """One pre-LN residual block of CLIP's ViT."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        """x (B, T, D) -> (x + attn(ln_1(x)), then + mlp(ln_2(.)))  and the attention probs (or None)."""
        raise NotImplementedError


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """Any PIL image -> float32 (3, size, size), exactly as CLIP prepares its inputs:

    1. to RGB; an image with transparency is composited onto white first;
    2. bicubic resize so the shorter side is `size` (the longer: int(size * long / short));
    3. center crop (offsets (H - size) // 2 and (W - size) // 2);
    4. x / 255 (in float64, then rounded to float32), then (x - CLIP_MEAN) / CLIP_STD per channel.
    """
    raise NotImplementedError
