"""`minimind_v.image.preprocess` equals transformers' CLIP image processor.

The reference is transformers' PIL/numpy CLIP processor (`CLIPImageProcessorPil`, which is what
`CLIPImageProcessor` resolves to without torchvision): the same algorithm as OpenAI's CLIP
transform. Images are random, in many sizes, aspect ratios and PIL modes.

One deliberate difference: the reference clips 16-bit samples to 0..255 (Pillow's own
`convert("RGB")`, which makes a 16-bit greyscale PNG solid white); ours scales them from 0..65535.
For I;16 the reference is therefore given the same samples already scaled to 8 bits.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from minimind_v.image import CLIP_MEAN, CLIP_STD, preprocess, to_rgb

transformers = pytest.importorskip("transformers")
try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as RefProcessor
except ImportError:   # older transformers: the class itself is the PIL implementation
    from transformers import CLIPImageProcessor as RefProcessor


@functools.lru_cache(maxsize=None)
def processor(size: int):
    return RefProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def reference(image: Image.Image, size: int = 224) -> torch.Tensor:
    proc = processor(size)
    out = proc(images=image, return_tensors="np")["pixel_values"]      # (1, 3, size, size)
    return torch.from_numpy(np.asarray(out)[0])


def random_image(mode: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth gradients plus noise (so bicubic resampling has real work), in the given mode."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 / max(width - 1, 1)), (yy * 255 / max(height - 1, 1)),
                     ((xx + yy) * 127 / max(width + height - 2, 1))], axis=-1)
    rgb = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)   # (H, W, 3)
    img = Image.fromarray(rgb, "RGB")
    if mode == "RGB":
        return img
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], rng.integers(0, 256, (height, width), dtype=np.uint8)]), "LA")
    if mode == "P":
        return img.quantize(colors=16)
    if mode == "P+transparency":
        pal = img.quantize(colors=16)
        pal.info["transparency"] = 3          # palette index 3 is see-through
        return pal
    if mode == "I;16":
        img16 = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        assert img16.mode == "I;16"
        return img16
    return img.convert(mode)                  # L, CMYK, 1, YCbCr


MODES = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "I;16", "1", "YCbCr"]
SIZES = [(224, 224), (640, 480), (300, 1000), (225, 224), (17, 31), (1, 1), (500, 223)]


@pytest.mark.parametrize("mode", MODES)
def test_preprocess_equals_clip_image_processor(mode):
    rng = np.random.default_rng(sum(map(ord, mode)))
    for width, height in SIZES:
        image = random_image(mode, width, height, rng)
        same_in_8_bits = image
        if mode == "I;16":       # the reference clips; give it the samples scaled as ours are
            same_in_8_bits = Image.fromarray(np.rint(np.asarray(image) / 257).astype(np.uint8), "L")
        ours, ref = preprocess(image), reference(same_in_8_bits)
        assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
        assert ours.std() > 0.1 or (width, height) == (1, 1)        # non-trivial values
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-6, f"mode {mode} size {width}x{height}: max abs diff {diff}"


@pytest.mark.parametrize("size", [32, 64, 336])
def test_preprocess_other_sizes(size):
    rng = np.random.default_rng(size)
    for width, height in [(100, 70), (70, 100), (400, 401)]:
        image = random_image("RGBA", width, height, rng)
        ours = preprocess(image, size=size)
        assert ours.shape == (3, size, size)
        torch.testing.assert_close(ours, reference(image, size), rtol=0, atol=1e-6)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (40, 30), (10, 200, 30, 0))           # fully transparent green
    assert to_rgb(image).getpixel((5, 5)) == (255, 255, 255)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(preprocess(image, size=16)[:, 8, 8], expected)


def test_not_an_image_is_a_clear_error():
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        preprocess(np.zeros((10, 10, 3), dtype=np.uint8))
