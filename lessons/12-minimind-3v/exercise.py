"""Lesson 12 exercises: minimind-3v's new pieces, per-head q/k RMSNorm, top-k routing, the
load-balancing loss, and SigLIP's preprocessing.

Run `pytest lessons/12-minimind-3v` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

import torch
from PIL import Image

REFERENCE = {
    "head_rms_norm": "minimind_v.norm:rms_norm",
    "route": "minimind_v.moe:route",
    "load_balancing_loss": "minimind_v.moe:load_balancing_loss",
    "preprocess_siglip": "minimind_v.siglip:preprocess_siglip",
}


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """q/k-norm: x (B, T, H, hd) queries or keys split into heads, weight (hd,) shared by all heads.

    Normalise every head vector on its own: y = x / sqrt(mean(x^2 over hd) + eps) * weight
    (mean of squares in at least float32, the normalised vector cast back to x.dtype, then * weight).
    Not over all H * hd numbers of a token at once: each head gets its own scale.
    """
    raise NotImplementedError


def route(logits: torch.Tensor, k: int, norm_topk_prob: bool = True):
    """Router logits (N, E) -> (probs (N, E), weights (N, k), experts (N, k) long).

    probs = softmax over all E experts (in at least float32); weights, experts = the k largest
    probabilities per token and their expert indices (largest first); with norm_topk_prob divide
    the k weights by (their sum + 1e-20).
    """
    raise NotImplementedError


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss for one layer. probs (N, E), experts (N, k) -> scalar.

    E * sum_e f_e * P_e, with f_e = (how many of the N*k choices picked expert e) / N (counted, so
    no gradient) and P_e = the mean over tokens of probs[:, e] (the gradient flows through it).
    """
    raise NotImplementedError


def preprocess_siglip(image: Image.Image, size: int = 256, resample: str = "bilinear",
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """A PIL image -> float32 (3, size, size) as SiglipImageProcessor makes it with upstream's settings.

    convert to RGB (RGBA / LA: just drop alpha, `image.convert("RGB")`); resize to size x size with
    Pillow's filter `resample` ("bilinear" -> Image.BILINEAR, "bicubic", "nearest", "lanczos";
    anything else: ValueError), no crop; x = uint8 / 255 computed in float64 then cast to float32;
    (x - mean) / std per channel in float32; channels first.
    """
    raise NotImplementedError
