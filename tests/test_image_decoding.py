"""Decoding pictures: wide sample formats are scaled (not clipped), sizes are bounded, the alpha
choice is explicit, the optional shrink stays within its stated tolerance, and every failure names
the file and what was expected."""
from __future__ import annotations

import glob
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from minimind_v.image import (CLIP_STD, MAX_ASPECT, MAX_PIXELS, REDUCING_GAP, BadImage, open_image,
                              preprocess, read_pixels, to_rgb)

PHOTOS = sorted(glob.glob("/work/shared/upstream/eval_images/*.jpg"))


def grey_ramp(height=30, width=40) -> np.ndarray:
    """(H, W) uint8 with every level 0..255 present and non-trivial structure."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, height * width).reshape(height, width)
    return np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------- more than 8 bits per sample
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_wide_samples_are_scaled_not_clipped(tmp_path, mode):
    g8 = grey_ramp()
    want = preprocess(Image.fromarray(g8, "L"), 32)
    if mode == "I;16":                    # saved as a real 16-bit PNG and read back
        Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
        image = open_image(tmp_path / "g16.png")
    elif mode == "I;16B":
        image = Image.frombytes("I;16B", (40, 30), (g8.astype(">u2") * 257).tobytes())
    elif mode == "I":                     # a 32-bit TIFF (how Pillow also opens some 16-bit files)
        Image.fromarray(g8.astype(np.int32) * 257).save(tmp_path / "g32.tif")
        image = open_image(tmp_path / "g32.tif")
    else:                                 # a float TIFF on the 0..1 scale
        Image.fromarray(g8.astype(np.float32) / 255).save(tmp_path / "f.tif")
        image = open_image(tmp_path / "f.tif")
    assert image.mode == mode
    got = preprocess(image, 32)
    assert got.std() > 0.5                # not solid white (what clipping gave)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_wide_values_outside_the_range_are_clipped_and_nan_is_an_error(tmp_path):
    f = np.array([[-0.5, 0.0, 0.5, 1.0, 7.0]], dtype=np.float32).repeat(5, 0)
    assert np.asarray(to_rgb(Image.fromarray(f, "F")))[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    f[2, 2] = np.nan
    Image.fromarray(f).save(tmp_path / "nan.tif")
    with pytest.raises(BadImage, match=r"nan\.tif: .*1 non-finite samples"):
        read_pixels(tmp_path / "nan.tif", 16)


def test_16_bit_transparent_value(tmp_path):
    g = np.full((8, 8), 1000, dtype=np.uint16)
    g[:4] = 65535
    im = Image.fromarray(g)
    im.info["transparency"] = 1000        # the lower half is see-through
    rgb = np.asarray(to_rgb(im))
    assert (rgb[:4] == 255).all() and (rgb[4:] == 255).all()               # white on white
    assert (np.asarray(to_rgb(im, alpha="drop"))[4:] == 4).all()            # round(1000 / 257)


# ---------------------------------------------------------------------- bounded cost, limits
def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height greyscale pixels (the data is absent)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_elongated_picture_is_refused_at_once(tmp_path):
    path = tmp_path / "stripe.png"
    Image.fromarray(np.zeros((5000, 1), np.uint8)).save(path)      # 1 x 5000, under 100 bytes
    with pytest.raises(BadImage, match=rf"stripe\.png: 1x5000 has an aspect ratio of 5000\.0; "
                                       rf"expected at most {MAX_ASPECT:g}"):
        open_image(path)
    with pytest.raises(BadImage, match="aspect ratio"):                # a PIL image from elsewhere too
        preprocess(Image.new("L", (1, 5000)))
    edge = Image.fromarray(np.tile(grey_ramp(1, int(MAX_ASPECT)), (1, 1)))   # 20 x 1: at the limit
    assert preprocess(edge, 16).shape == (3, 16, 16)


@pytest.mark.parametrize("side", [9500, 14000])       # over Pillow's warning, over its error threshold
def test_too_many_pixels_is_our_error_not_a_warning(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    assert side * side > MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # no DecompressionBombWarning escapes
        with pytest.raises(BadImage, match=rf"bomb\.png: .*expected at most {MAX_PIXELS:,} pixels"):
            open_image(path)


@pytest.mark.parametrize("name, content, problem", [
    ("missing.png", None, "not found"),
    ("text.png", b"hello, not a picture", "cannot be read as a picture"),
    ("truncated.png", "half", "cannot be decoded"),
])
def test_every_failure_names_the_file(tmp_path, name, content, problem):
    path = tmp_path / name
    if content == "half":
        Image.fromarray(grey_ramp()).save(tmp_path / "whole.png")
        whole = (tmp_path / "whole.png").read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImage) as err:
        read_pixels(path, 16)
    assert str(err.value).startswith(f"image {path}: {problem}") and "; expected " in str(err.value)
    assert isinstance(err.value, ValueError) and err.value.path == path
    if path.exists():                                                      # the same bytes, named by the caller
        with pytest.raises(BadImage, match=rf"^image row 3 image 0: {problem}"):
            read_pixels("row 3 image 0", 16, data=path.read_bytes())


# ---------------------------------------------------------------------- alpha
def rgba_picture(seed=0, size=(60, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")


def test_alpha_drop_is_convert_rgb_and_white_stays_the_default():
    im = rgba_picture()
    drop = preprocess(im, 32, alpha="drop")
    torch.testing.assert_close(drop, preprocess(im.convert("RGB"), 32), rtol=0, atol=0)
    white = preprocess(im, 32)
    torch.testing.assert_close(white, preprocess(im, 32, alpha="white"), rtol=0, atol=0)
    assert (white - drop).abs().max() > 1.0                           # the choice matters
    la = Image.fromarray(np.dstack([grey_ramp(), grey_ramp()[::-1]]), "LA")
    torch.testing.assert_close(preprocess(la, 16, alpha="drop"), preprocess(la.convert("RGB"), 16))
    with pytest.raises(ValueError, match="alpha must be one of"):
        preprocess(im, 32, alpha="black")


# ---------------------------------------------------------------------- the optional shrink
def photos_or_generated(tmp_path) -> list:
    """The upstream evaluation photos when present, else generated JPEGs with edges and texture."""
    if PHOTOS:
        return PHOTOS
    rng = np.random.default_rng(1)
    out = []
    for k, (w, h) in enumerate([(640, 640), (975, 731), (1152, 864)]):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 40.0 + yy / 55.0)], -1)
        rgb[(xx // 97 + yy // 61) % 3 == 0] = rng.integers(0, 256, 3)          # hard-edged blocks
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)                           # photo-like: no pixel noise
        Image.fromarray(rgb).save(tmp_path / f"g{k}.jpg", quality=90)
        out.append(tmp_path / f"g{k}.jpg")
    return out


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalized pixel values -> their difference in 0..255 grey levels, (3, S, S)."""
    return (a - b).abs() * torch.tensor(CLIP_STD)[:, None, None] * 255


# sizes small beside the photos, so that the shrink factor is 2 to 4 (a 640-px photo at 80 is like
# a 1792-px photo at 224): the tolerance stated in minimind_v/image.py's docstring
@pytest.mark.parametrize("size", [56, 80, 100])
def test_reducing_gap_stays_within_the_stated_tolerance(tmp_path, size):
    for path in photos_or_generated(tmp_path):
        full = open_image(path)
        assert min(full.size) >= 2 * REDUCING_GAP * size                # the shrink really happens
        exact = preprocess(full, size)
        reduced = levels(preprocess(full, size, reducing_gap=REDUCING_GAP), exact)
        drafted_image = open_image(path, draft_size=size, reducing_gap=REDUCING_GAP)
        assert drafted_image.size[0] <= (full.size[0] + 1) // 2               # decoded at 1/2 scale or less
        drafted = levels(preprocess(drafted_image, size, reducing_gap=REDUCING_GAP), exact)
        for diff in (reduced, drafted):
            assert diff.max() <= 8.0 + 1e-3 and diff.mean() <= 0.35, (path, size, diff.max(), diff.mean())


def test_reducing_gap_leaves_ordinary_sizes_exact(tmp_path):
    for path in photos_or_generated(tmp_path):
        im = open_image(path, draft_size=224, reducing_gap=REDUCING_GAP)
        assert im.size == Image.open(path).size                         # under 6 x 224: not drafted
        torch.testing.assert_close(preprocess(im, 224, reducing_gap=REDUCING_GAP), preprocess(im, 224),
                                   rtol=0, atol=0)
