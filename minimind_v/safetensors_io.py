"""A small reader and writer for the safetensors format (no dependency on the safetensors package).

Where it sits: `clip_weights` uses it to read Hugging Face `model.safetensors` files.

The format is deliberately simple, and nothing in it can run code:
    8 bytes   N, the header length, unsigned little-endian
    N bytes   a JSON object: {"name": {"dtype": "F16", "shape": [768, 3, 16, 16],
                                       "data_offsets": [begin, end]}, ...,
                              "__metadata__": {"format": "pt"}}   (metadata optional)
    the rest  the raw little-endian tensor bytes; offsets are relative to the end of the header

The reader trusts nothing in the file: the header must describe the data region exactly (each
tensor's byte range the size its dtype and shape need, the ranges back to back with no overlap
and no gap, ending where the file ends), and every loaded floating-point tensor must be finite
(`check_finite`, also used for other weight files), so that a truncated or damaged file is an
error naming the file and the key, never NaN weights loaded in silence.
"""
from __future__ import annotations

import json
import os
import struct

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024     # a header larger than this is not a real file


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file; the message names the file (and key)."""


class NonFiniteWeights(ValueError):
    """Weights holding NaN or infinity; the message names the source and the keys."""


def check_finite(state_dict: dict, source) -> None:
    """NonFiniteWeights unless every floating-point tensor of `state_dict` is finite.

    `source` names where the weights came from (a file path) in the message, which lists the
    first few bad keys and how many of their values are NaN or infinite.
    """
    bad = []
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"key {name!r}: {n} of {t.numel()} values are NaN or infinite")
    if bad:
        more = f" (and {len(bad) - 3} more keys)" if len(bad) > 3 else ""
        raise NonFiniteWeights(f"{source}: " + "; ".join(bad[:3]) + more +
                               "; expected finite weights (a damaged or diverged file?)")


def read_header(path) -> tuple[dict, int]:
    """-> (the JSON header, the byte offset where tensor data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} does not fit in a {size}-byte file "
                                   "(not safetensors, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    return header, 8 + n


def check_layout(path, header: dict, start: int, size: int) -> dict[str, tuple]:
    """Header entries -> {name: (dtype, shape, begin, end)}, checked against the file's data region.

    Every entry needs a known dtype, a shape of non-negative ints and `data_offsets` [begin, end]
    with end - begin = the bytes its dtype and shape need; sorted by begin, the ranges must follow
    each other with no overlap and no gap, from 0 to the end of the file (`size` bytes in all).
    """
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
            if min(shape, default=0) < 0:
                raise ValueError("negative dimension")
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: key {name!r}: bad header entry {info!r} ({type(e).__name__}: {e}); "
                                   f"expected dtype one of {sorted(DTYPES)}, a shape and data_offsets [begin, end]") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise SafetensorsError(f"{path}: key {name!r}: {info['dtype']} {shape} needs {nbytes} bytes, "
                                   f"header gives offsets [{begin}, {end}]")
        entries[name] = (dtype, shape, begin, end)
    data_size = size - start
    position, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < position:
            raise SafetensorsError(f"{path}: key {name!r}: data [{begin}, {end}] overlaps key {previous!r}'s, "
                                   f"which ends at {position}; expected each tensor its own bytes")
        if begin > position:
            raise SafetensorsError(f"{path}: key {name!r}: data starts at {begin} but the previous tensor ends at "
                                   f"{position}; expected no gap between tensors")
        if end > data_size:
            raise SafetensorsError(f"{path}: key {name!r}: data ends at byte {start + end} but the file "
                                   f"has {size} bytes (truncated?)")
        position, previous = end, name
    if position != data_size:
        raise SafetensorsError(f"{path}: the tensors' data ends at byte {start + position} but the file has "
                               f"{size} bytes; expected nothing after the last tensor")
    return entries


def load_file(path, device: str = "cpu", check: bool = True) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file into a dict name -> tensor (a copy, in file dtype).

    The layout is checked first (`check_layout`); with `check` (the default) every floating-point
    tensor must also be finite (`check_finite`).
    """
    header, start = read_header(path)
    size = os.path.getsize(path)
    entries = check_layout(path, header, start, size)
    out = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(start + begin)
            buf = bytearray(f.read(end - begin))
            if len(buf) != end - begin:
                raise SafetensorsError(f"{path}: key {name!r}: could read only {len(buf)} of {end - begin} bytes")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape).to(device)
    if check:
        check_finite(out, path)
    return out


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as a safetensors file (atomically: temp file, then rename)."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)               # pad so tensor data starts 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
