"""A small reader and writer for the safetensors format (no dependency on the safetensors package).

Where it sits: `clip_weights` uses it to read Hugging Face `model.safetensors` files.

The format is deliberately simple, and nothing in it can run code:
    8 bytes   N, the header length, unsigned little-endian
    N bytes   a JSON object: {"name": {"dtype": "F16", "shape": [768, 3, 16, 16],
                                       "data_offsets": [begin, end]}, ...,
                              "__metadata__": {"format": "pt"}}   (metadata optional)
    the rest  the raw little-endian tensor bytes; offsets are relative to the end of the header
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
    pass


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


def load_file(path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file into a dict name -> tensor (a copy, in file dtype)."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{path}: key {name!r}: bad header entry {info!r} ({e})") from None
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise SafetensorsError(f"{path}: key {name!r}: {info['dtype']} {shape} needs {nbytes} bytes, "
                                       f"header gives offsets [{begin}, {end}]")
            if start + end > size:
                raise SafetensorsError(f"{path}: key {name!r}: data ends at byte {start + end} but the file "
                                       f"has {size} bytes (truncated?)")
            f.seek(start + begin)
            buf = bytearray(f.read(nbytes))
            t = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape).to(device)
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
