"""Image preprocessing identical to CLIP's: any PIL image -> a normalized (3, S, S) tensor.

Where it sits: the first step of the data flow. A picture on disk becomes the pixel tensor that
`vision.CLIPVisionTransformer` reads. CLIP's weights were trained on inputs prepared exactly this
way, so any difference here (another resampling filter, another crop, another mean) quietly shifts
every patch vector the language model sees.

The recipe (the same steps, in the same order and the same float precision, as OpenAI's CLIP
transform and transformers' `CLIPImageProcessor`):
1. `to_rgb`: any mode (RGB, RGBA, LA, L, P, CMYK, I;16, I, F, ...) -> 8-bit RGB;
2. resize so the shorter side is `size`, bicubic, keeping the aspect ratio
   (the longer side becomes int(size * long / short));
3. center crop to size x size;
4. scale 0..255 to 0..1 and normalize each channel with CLIP's mean and std.

Alpha, a choice (`alpha=` of `to_rgb` and `preprocess`):
- "white" (the default): transparent pixels are composited onto opaque white, as transformers'
  CLIPImageProcessor does (a transparent logo becomes a logo on white, not on black);
- "drop": the alpha band is ignored and the stored colours kept, which is PIL's
  `image.convert("RGB")`. Upstream MiniMind-V does exactly this to RGBA and LA pictures before
  its processor, so "drop" reproduces its training inputs on them. The two choices differ wherever
  a pixel is see-through, by up to 1 / std = 3.8 in normalized units (3.65 measured on an RGBA
  picture).

More than 8 bits per sample: Pillow's own `convert("RGB")` clips 16-bit, 32-bit and float samples
to 0..255, which turns an ordinary 16-bit greyscale PNG solid white. `to_rgb` scales them instead,
each mode from its nominal range: I;16 / I;16B / I;16L / I;16N (and I, which is how Pillow opens
16-bit greyscale PNG and TIFF files) from 0..65535, F (float TIFF) from 0.0..1.0, rounding to
the nearest of the 256 levels (65535 / 257 = 255, so an 8-bit picture stored in 16 bits comes back
exactly). Values outside the nominal range are clipped.

Bounded cost, and pictures refused: decoding costs memory in proportion to width x height, and the
exact resize of a very elongated picture builds a huge intermediate (a 1 x 5000 stripe becomes
224 x 1,120,000 pixels before the crop). So `open_image` and `preprocess` refuse, with `BadImage`,
pictures of more than `MAX_PIXELS` pixels (Pillow's own decompression-bomb threshold; its warning
becomes our error) or whose longer side is more than `MAX_ASPECT` times the shorter (past that the
center crop keeps less than 1/20 of the picture: not a picture a question can be asked about).
Within those limits the exact path costs at most one decoded picture plus a
size x (size * MAX_ASPECT) intermediate.
For very large photos `reducing_gap` (off by default, so results stay exactly CLIP's) first
shrinks by an integer factor (Pillow's `reduce`, or for a JPEG file `draft`, i.e. decoding at
1/2, 1/4 or 1/8 scale) while the shorter side stays at least `reducing_gap` x size, then resizes
exactly. With `reducing_gap=3` (REDUCING_GAP) the result on real photos differs from the exact path
by at most 8 of 255 grey levels at sharp edges and 0.35 levels on average per picture (measured
on upstream MiniMind-V's evaluation photos in tests/test_image_decoding.py); a picture whose shorter side is under 6 x size is not touched.

Every failure to open a file is a `BadImage` (a ValueError) naming the file and what was expected:
`open_image(path)` is the one way data.py and chat/eval read pictures.

Uses only Pillow and numpy; the result is a float32 torch tensor.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Statistics of CLIP's training images, per RGB channel (on the 0..1 scale).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_PIXELS = 89_478_485     # width x height; Pillow's decompression-bomb threshold (about 0.25 GB as RGB)
MAX_ASPECT = 20.0           # longer side / shorter side
REDUCING_GAP = 3.0          # a `reducing_gap` whose results stay within a few grey levels of the exact path
ALPHA_CHOICES = ("white", "drop")

# Modes whose last band is an alpha channel (lower-case 'a' = premultiplied alpha).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Modes with more than 8 bits per sample -> the top of their nominal range (scaled to 255).
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


class BadImage(ValueError):
    """A picture that cannot be used: the message names the file (or the picture) and what was expected."""

    def __init__(self, path, problem: str, expected: str = "a readable picture"):
        super().__init__(f"image {path}: {problem}; expected {expected}")
        self.path = path
        self.problem = problem


# ---------------------------------------------------------------------- checks and opening
def check_size(width: int, height: int, name="<image>", max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT) -> None:
    """BadImage unless 1 <= width, height, width * height <= max_pixels and the aspect ratio <= max_aspect."""
    if min(width, height) <= 0:
        raise BadImage(name, f"empty picture of size {width}x{height}", "width and height of at least 1")
    if width * height > max_pixels:
        raise BadImage(name, f"{width}x{height} = {width * height:,} pixels",
                       f"at most {max_pixels:,} pixels (image.MAX_PIXELS)")
    if max(width, height) > max_aspect * min(width, height):
        raise BadImage(name, f"{width}x{height} has an aspect ratio of {max(width, height) / min(width, height):.1f}",
                       f"at most {max_aspect:g} (image.MAX_ASPECT): the center crop would keep "
                       f"under 1/{max_aspect:g} of it")


def open_image(path, data: bytes | None = None, *, max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT, draft_size: int | None = None,
               reducing_gap: float | None = None) -> Image.Image:
    """A picture file (or its bytes, `data`, named `path` in messages) -> a fully decoded PIL image.

    Checks before decoding that it is not too large or too elongated (`check_size`), so a small
    file that would decode to gigabytes costs nothing; every failure is a BadImage naming `path`.
    `draft_size` with `reducing_gap`: a JPEG is decoded at 1/2, 1/4 or 1/8 scale where its shorter
    side stays >= reducing_gap * draft_size (see the module docstring for what that costs in exactness).
    The image is returned in its own mode (see `to_rgb`) and holds no open file.
    """
    if data is None:
        p = Path(path)
        if not p.is_file():
            raise BadImage(path, "not found" if not p.exists() else "not a file", "an existing picture file")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BadImage(path, f"cannot be read ({type(e).__name__}: {e})") from None
    try:
        with warnings.catch_warnings():
            # our own check_size below is the limit; Pillow's warning (and its error at twice its
            # threshold) must not pass silently or escape as another kind of error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(path, f"too large ({e})", f"at most {max_pixels:,} pixels") from None
    except Exception as e:       # PIL raises many kinds for files that are not pictures
        raise BadImage(path, f"cannot be read as a picture ({type(e).__name__}: {e})",
                       "a PNG, JPEG, WebP, GIF, BMP or TIFF file") from None
    check_size(*im.size, name=path, max_pixels=max_pixels, max_aspect=max_aspect)
    if draft_size is not None and reducing_gap is not None and im.format == "JPEG":
        w, h = im.size
        k = reducing_gap * draft_size / min(w, h)
        if k < 1:                # the largest 1/n scale whose size is >= the request
            drafted = im.draft(im.mode, (math.ceil(w * k), math.ceil(h * k)))
            if drafted is not None and im.size != (w, h):
                im.info["source_size"], im.info["source_box"] = (w, h), drafted[1]   # what the pixels cover
    try:
        im.load()
    except Exception as e:       # truncated or corrupt data
        raise BadImage(path, f"cannot be decoded ({type(e).__name__}: {e})", "a complete, uncorrupted picture") from None
    return im


def read_pixels(path, size: int = 224, data: bytes | None = None, alpha: str = "white",
                reducing_gap: float | None = None, transform=None) -> torch.Tensor:
    """A picture file (or its bytes) -> CLIP pixel values (3, size, size); any failure names the file.

    transform: another encoder's preprocessing, `transform(pil_image) -> (3, S, S)` (SigLIP's, see
    `vlm.pixel_transform`), used instead of CLIP's after the same decoding checks.
    """
    im = open_image(path, data, draft_size=size if transform is None else None, reducing_gap=reducing_gap)
    try:
        if transform is not None:
            return transform(im)
        return preprocess(im, size, alpha=alpha, reducing_gap=reducing_gap)
    except BadImage as e:
        raise BadImage(path, e.problem, str(e).split("; expected ", 1)[1]) from None
    except ValueError as e:
        raise BadImage(path, str(e)) from None


# ---------------------------------------------------------------------- mode -> RGB
def _scale_wide(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float greyscale image -> mode L (or LA for a transparent value), scaled.

    (H, W) samples in 0..top -> round(x * 255 / top) in 0..255; outside that range clipped.
    """
    top = _WIDE_MODES[image.mode]
    if image.mode == "F":
        x = np.asarray(image, dtype=np.float64)                        # (H, W)
        if not np.isfinite(x).all():
            raise ValueError(f"mode F picture with {int((~np.isfinite(x)).sum())} non-finite samples "
                             "(expected numbers in 0.0..1.0)")
    else:
        x = np.asarray(image.convert("I") if image.mode != "I" else image).astype(np.float64)   # (H, W)
    grey = np.rint(np.clip(x, 0, top) * (255 / top)).astype(np.uint8)  # (H, W)
    out = Image.fromarray(grey, "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)):
        alpha = np.where(x == transparent, 0, 255).astype(np.uint8)    # (H, W)
        out = Image.fromarray(np.dstack([grey, alpha]), "LA")
    return out


def to_rgb(image: Image.Image, alpha: str = "white") -> Image.Image:
    """Any PIL image -> an 8-bit RGB PIL image.

    alpha="white": an image with an alpha band (RGBA, LA, PA) or a palette/grey image with a
    transparent colour (`image.info["transparency"]`) is composited onto opaque white, as
    transformers' CLIPImageProcessor does. alpha="drop": the alpha band and the transparent colour
    are ignored (PIL's `image.convert("RGB")`, upstream MiniMind-V's choice for RGBA and LA).
    16-bit, 32-bit and float greyscale samples are scaled from their nominal range (module
    docstring); every other mode goes through Pillow's `convert("RGB")` (L -> grey replicated,
    CMYK -> RGB, P -> its palette colours).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if alpha not in ALPHA_CHOICES:
        raise ValueError(f"alpha must be one of {ALPHA_CHOICES}, got {alpha!r}")
    if image.mode in _WIDE_MODES:
        image = _scale_wide(image)
    if image.mode == "La":                   # premultiplied grey: Pillow converts it only to LA
        image = image.convert("RGBa").convert("RGBA")
    try:
        if alpha == "white" and (image.mode in _ALPHA_MODES or image.info.get("transparency") is not None):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:      # a mode Pillow cannot turn into RGB
        raise ValueError(f"cannot convert a mode {image.mode} picture to RGB ({e})") from None


# ---------------------------------------------------------------------- geometry and scaling
def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after a resize that makes the shorter side `size`, keeping the aspect ratio."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)          # truncation, as torchvision/transformers do
    return (size, new_long) if width <= height else (new_long, size)


def resize_shorter_side(image: Image.Image, size: int, reducing_gap: float | None = None,
                        source_size: tuple[int, int] | None = None, box=None) -> Image.Image:
    """Bicubic resize so that min(width, height) == size, keeping the aspect ratio.

    `source_size` and `box`: the picture was decoded at a reduced scale (`open_image`'s draft);
    the output size follows the full picture's `source_size` and `box` is the region of `image`
    it covers, so the geometry is that of the full picture.
    """
    width, height = source_size or image.size
    return image.resize(shorter_side_size(width, height, size), resample=Image.BICUBIC, box=box,
                        reducing_gap=reducing_gap)


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


def preprocess(image: Image.Image, size: int = 224, alpha: str = "white",
               reducing_gap: float | None = None) -> torch.Tensor:
    """A PIL image of any mode and size -> CLIP pixel values, a float32 tensor (3, size, size).

    alpha: "white" (composite on white, CLIP's processor) or "drop" (PIL's convert("RGB"),
    upstream MiniMind-V on RGBA/LA). reducing_gap: None = exactly CLIP's result; a number (e.g.
    REDUCING_GAP) shrinks very large pictures by an integer factor first (module docstring).
    Pictures past MAX_PIXELS or MAX_ASPECT raise BadImage.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    source_size, box = image.info.get("source_size"), image.info.get("source_box")
    check_size(*(source_size or image.size))
    rgb = to_rgb(image, alpha)
    rgb = resize_shorter_side(rgb, size, reducing_gap, source_size, box)
    pixels = center_crop(np.asarray(rgb), size)                            # (size, size, 3) uint8
    pixels = normalize(pixels)                                             # (size, size, 3) float32
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))   # (3, size, size)
