"""CLIP's vision transformer (ViT-B/16) from raw torch ops: the eyes of MiniMind-V.

Where it sits: `image.preprocess` gives pixels (B, 3, 224, 224); this encoder turns them into
one vector per 16x16 patch; the VLM drops the CLS vector and projects the 196 patch vectors into
the language model's embedding space (`vlm.VisionProjector`). The encoder is frozen: its weights
come from OpenAI's CLIP (see `clip_weights.load_clip_vision`), so every detail below must match
CLIP exactly or the pretrained weights compute something else.

The data flow, for ViT-B/16 (D = 768, P = 196 patches, T = 1 + P = 197 tokens):
    pixels (B, 3, 224, 224)
    -> patch embedding: a 16x16 conv with stride 16, no bias    (B, D, 14, 14) -> (B, 196, D)
       (the same as cutting the image into patches and applying one Linear to each, see `patchify`)
    -> prepend the learned CLS vector                          (B, 197, D)
    -> add learned position embeddings (one per token slot)    (B, 197, D)
    -> ln_pre (CLIP normalizes before the first block)
    -> 12 pre-LN residual blocks:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
       attention: 12 heads of 64, no mask (every patch sees every patch);
       mlp: Linear(768, 3072) -> quick_gelu -> Linear(3072, 768)
    -> `forward` returns this: the last block's output, BEFORE ln_post   (B, 197, D)
    -> ln_post(CLS) = the pooled image vector; @ proj = CLIP's image embedding (B, 512)

MiniMind-V uses `forward(pixels)[:, 1:, :]`: the 196 patch vectors before the final LayerNorm.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation: x * sigmoid(1.702 x), a cheap approximation of GELU it was trained with."""
    return x * torch.sigmoid(1.702 * x)


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping square patches, each flattened in (channel, row, col) order.

    (B, C, H, W) -> (B, N, C * p * p) with N = (H / p) * (W / p), patches in row-major order.
    With this order, `patchify(x, p) @ conv.weight.reshape(D, -1).T` equals the stride-p conv.
    """
    B, C, H, W = pixels.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    x = pixels.reshape(B, C, H // p, p, W // p, p)        # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                         # (B, gh, gw, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)     # (B, N, C*p*p)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool = False):
    """Hand-written multi-head attention without a mask: softmax(Q K^T / sqrt(d)) V.

    q, k, v: (B, H, T, d). Returns (out (B, H, T, d), probs (B, H, T, T) or None).
    """
    # scaling q (T x d numbers) before the product = scaling the scores (T x T), but cheaper
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)   # (B, H, T, T)
    probs = scores.softmax(dim=-1)                              # each row sums to 1
    return probs @ v, (probs if need_weights else None)         # (B, H, T, d)


class VisionAttention(nn.Module):
    """Multi-head self-attention with one fused QKV matrix (OpenAI's `in_proj` layout: q, k, v rows)."""

    def __init__(self, cfg: VisionConfig, attn_impl: str = "manual"):
        super().__init__()
        if attn_impl not in ("manual", "sdpa"):
            raise ValueError(f"attn_impl must be 'manual' or 'sdpa', got {attn_impl!r}")
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)   # rows: [W_q; W_k; W_v]
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)   # (B, T, 3, H, d)
        # one copy into head-major layout, so the matmuls below need no hidden copies of their own
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)          # each (B, H, T, d)
        if self.attn_impl == "sdpa" and not need_weights:
            out, probs = F.scaled_dot_product_attention(q, k, v), None       # opt-in fast path
        else:
            out, probs = attention(q, k, v, need_weights)
        out = out.transpose(1, 2).reshape(B, T, D)                           # (B, T, H*d)
        return self.out(out), probs


class VisionMLP(nn.Module):
    """fc2(quick_gelu(fc1(x))): (B, T, D) -> (B, T, 4D) -> (B, T, D).

    `forward` computes exactly that with one trick: quick_gelu(y) = y * sigmoid(1.702 y) equals
    silu(1.702 y) / 1.702, and both constants fold into the matmuls (addmm's `alpha`/`beta`), so
    the (B, T, 4D) activation takes one fused silu pass instead of three elementwise passes
    (1.702 * y, sigmoid, multiply). `forward_plain` is the direct form; tests prove both equal.
    """

    A = 1.702

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, D = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, D)                                                          # (N, D)
        z = torch.addmm(self.fc1.bias, x, self.fc1.weight.t(), beta=self.A, alpha=self.A)   # 1.702 * fc1(x)
        out = torch.addmm(self.fc2.bias, F.silu(z), self.fc2.weight.t(), alpha=1.0 / self.A)
        return out.reshape(*lead, -1)                                                 # (.., D)


class VisionBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: VisionConfig, attn_impl: str = "manual"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg, attn_impl)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        a, probs = self.attn(self.ln_1(x), need_weights)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, probs


def patch_tokens(patch_embed: nn.Conv2d, cfg: VisionConfig, pixels: torch.Tensor, stem=None) -> torch.Tensor:
    """pixels (B, C, S, S) -> one vector per patch (B, P, D), row-major, by `cfg.stem`:
    "patch": CLIP's stride-p convolution; "conv": a `ConvStem`'s per-patch maxima through a 1x1
    convolution (`patch_embed`); "both": the stride-p convolution plus the stem's own 1x1 of them."""
    S = cfg.image_size
    if pixels.dim() != 4 or pixels.shape[1:] != (cfg.num_channels, S, S):
        raise ValueError(f"expected pixels of shape (B, {cfg.num_channels}, {S}, {S}), got {tuple(pixels.shape)}")
    pixels = pixels.to(patch_embed.weight.dtype)
    if cfg.stem == "conv":
        x = patch_embed(stem(pixels))                                    # (B, K, S/p, S/p) -> (B, D, S/p, S/p)
    elif cfg.stem == "both":
        x = patch_embed(pixels) + stem(pixels)                           # (B, D, S/p, S/p), summed
    else:
        x = patch_embed(pixels)                                          # (B, D, S/p, S/p)
    return x.flatten(2).transpose(1, 2)                                  # (B, P, D)


class ConvStem(nn.Module):
    """A small convolution stem for a frozen *random* encoder: pixels (B, C, S, S) -> (B, K, S/p, S/p).

    A stride-p patch convolution sees an object through fixed weights at each pixel offset, so
    with random weights the same red square gives a different vector wherever it sits in its
    patch (a random projection of 3p^2 pixels to D numbers keeps little of "how much red").
    Here a KxK convolution (stride 1, ReLU) looks for local colour and edges at every pixel, and
    a max over each p x p patch keeps the strongest response: the same vector for a shape
    wherever it falls inside the patch. Used by `model-config --stem conv` (VisionConfig.stem).

    With `width` (the "both" stem) a 1x1 convolution `proj` takes the maxima to the ViT width
    here, so that they add to CLIP's stride-p patch vectors: (B, D, S/p, S/p). Those keep what a
    shape looks like across the whole patch, these what it is wherever it sits inside it.
    """

    def __init__(self, cfg: VisionConfig, width: int | None = None):
        super().__init__()
        k = cfg.stem_kernel
        self.conv = nn.Conv2d(cfg.num_channels, cfg.stem_channels, kernel_size=k, padding=k // 2)
        self.pool = nn.MaxPool2d(cfg.patch_size)
        self.proj = nn.Conv2d(cfg.stem_channels, width, kernel_size=1, bias=False) if width else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # channels-last (NHWC): the layout the CPU's convolution is fast in with 3 input channels
        # (benchmarks/bench_conv_stem.py)
        x = self.conv(pixels.contiguous(memory_format=torch.channels_last))   # (B, K, S, S)
        x = torch.relu(self.pool(x))     # (B, K, S/p, S/p); ReLU after the max: the same numbers (it is
        #                                  monotone), on p^2 times fewer of them
        return x if self.proj is None else self.proj(x)                  # (B, D, S/p, S/p) with proj


def assign_weights(model: nn.Module, sd: dict, path, error, dtype=torch.float32) -> nn.Module:
    """Check that `sd` has exactly `model`'s keys and shapes (else `error` naming `path` and the key),
    then assign the tensors (no copy of an init); returns the model in eval mode."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in sd:
            raise error(f"{path}: missing weight for {key}")
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise error(f"{path}: {key} has shape {tuple(sd[key].shape)}, expected {tuple(ref.shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise error(f"{path}: unexpected weight(s) {extra[:5]}")
    model.load_state_dict({k: sd[k].to(dtype).contiguous() for k in expected}, strict=True, assign=True)
    return model.eval()


class CLIPVisionTransformer(nn.Module):
    """CLIP's image tower. `forward(pixels)` -> (B, 1+P, D), the last block's output before ln_post.

    `with_projection=False` builds a tower without `proj` (as in a Hugging Face CLIPVisionModel
    checkpoint, which has no projection); `image_embeds` then raises.
    `attn_impl="sdpa"` swaps the hand-written attention for F.scaled_dot_product_attention.
    """

    def __init__(self, cfg: VisionConfig, with_projection: bool = True, attn_impl: str = "manual"):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        if cfg.stem == "conv":                          # conv stem + max per patch, then 1x1 to width D
            self.stem = ConvStem(cfg)
            self.patch_embed = nn.Conv2d(cfg.stem_channels, D, kernel_size=1, bias=False)
        else:                                           # CLIP: one stride-p convolution ("both": + the stem's)
            self.stem = ConvStem(cfg, width=D) if cfg.stem == "both" else None
            self.patch_embed = nn.Conv2d(cfg.num_channels, D, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        self.position_embedding = nn.Parameter(torch.randn(1 + cfg.num_patches, D) * D ** -0.5)
        self.ln_pre = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg, attn_impl) for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(D, cfg.projection_dim, bias=False) if with_projection else None
        for name, p in self.named_parameters():         # CLIP-like random init (tests, demos)
            if p.dim() == 2 and "embedding" not in name:
                nn.init.normal_(p, std=0.02)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, S, S) -> token vectors (B, 1+P, D) entering the first block (after ln_pre)."""
        x = patch_tokens(self.patch_embed, self.cfg, pixels, self.stem)   # (B, P, D), row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)                                    # (B, 1+P, D)
        x = x + self.position_embedding.to(x.dtype)                       # (B, 1+P, D)
        return self.ln_pre(x)

    def encode(self, pixels: torch.Tensor, need_weights: bool = False):
        """-> (hidden (B, 1+P, D) before ln_post, list of per-layer attention probs (B, H, T, T))."""
        x = self.embed(pixels)
        attns = []
        for block in self.blocks:
            x, probs = block(x, need_weights)
            if need_weights:
                attns.append(probs)
        return x, attns

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(pixels)[0]                   # (B, 1+P, D)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """What MiniMind-V feeds its projector: the patch vectors, CLS dropped. (B, P, D)."""
        return self.forward(pixels)[:, 1:, :]

    def pooled_output(self, pixels: torch.Tensor) -> torch.Tensor:
        """ln_post of the CLS vector (transformers' `pooler_output`). (B, D)."""
        return self.ln_post(self.forward(pixels)[:, 0, :])

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding: pooled @ proj (transformers' `image_embeds`). (B, E)."""
        if self.proj is None:
            raise RuntimeError("this vision tower has no projection (its checkpoint had none)")
        return self.proj(self.pooled_output(pixels))
