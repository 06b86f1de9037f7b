"""Image preprocessing identical to CLIP's: any PIL image -> a normalized (3, S, S) tensor.

Where it sits: the first step of the data flow. A picture on disk becomes the pixel tensor that
`vision.CLIPVisionTransformer` reads. CLIP's weights were trained on inputs prepared exactly this
way, so any difference here (another resampling filter, another crop, another mean) quietly shifts
every patch vector the language model sees.

The recipe (the same steps, in the same order and the same float precision, as OpenAI's CLIP
transform and transformers' `CLIPImageProcessor`):
1. `to_rgb`: any mode (RGB, RGBA, LA, L, P, CMYK, I;16, ...) -> 8-bit RGB. Transparent pixels are
   composited onto a white background (a transparent logo becomes a logo on white, not on black).
2. resize so the shorter side is `size`, bicubic, keeping the aspect ratio
   (the longer side becomes int(size * long / short));
3. center crop to size x size;
4. scale 0..255 to 0..1 and normalize each channel with CLIP's mean and std.

Uses only Pillow and numpy; the result is a float32 torch tensor.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Statistics of CLIP's training images, per RGB channel (on the 0..1 scale).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Modes whose last band is an alpha channel (lower-case 'a' = premultiplied alpha).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> an 8-bit RGB PIL image.

    Alpha is not dropped: an image with an alpha band (RGBA, LA, PA) or a palette/grey image
    with a transparent colour (`image.info["transparency"]`) is composited onto opaque white,
    as transformers' CLIPImageProcessor does. Every other mode goes through Pillow's own
    `image.convert("RGB")` (L -> grey replicated, CMYK -> RGB, I;16 -> values clipped to 0..255).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that min(width, height) == size, keeping the aspect ratio."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)          # truncation, as torchvision/transformers do
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return image.resize((new_w, new_h), resample=Image.BICUBIC)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) with H, W >= size -> the central (size, size, C) window (offsets rounded down)."""
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top:top + size, left:left + size]


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (H, W, 3): x / 255, then (x - mean) / std per channel.

    The scaling is done in float64 and rounded once to float32 (as the reference does), so the
    result matches it bit for bit rather than to a tolerance.
    """
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)          # (H, W, 3) in [0, 1]
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    return (x - mean) / std


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """A PIL image of any mode and size -> CLIP pixel values, a float32 tensor (3, size, size)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    rgb = to_rgb(image)
    if min(rgb.size) == 0:
        raise ValueError(f"cannot preprocess an empty image of size {rgb.size}")
    rgb = resize_shorter_side(rgb, size)
    pixels = center_crop(np.asarray(rgb), size)                            # (size, size, 3) uint8
    pixels = normalize(pixels)                                             # (size, size, 3) float32
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))   # (3, size, size)
