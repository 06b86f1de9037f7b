"""safetensors_io: a damaged file is an error naming the file and the key, never weights loaded in
silence (NaN/inf values, truncated data, overlapping or gapped offsets, trailing bytes)."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from minimind_v.safetensors_io import (NonFiniteWeights, SafetensorsError, check_finite, load_file,
                                       read_header, save_file)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g).half(),
            "steps": torch.tensor([1, 2, 3])}


def write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_round_trip(tmp_path):
    save_file(tensors(), tmp_path / "ok.safetensors")
    got = load_file(tmp_path / "ok.safetensors")
    assert got.keys() == tensors().keys()
    for k, v in tensors().items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_name_the_file_and_key(tmp_path, value):
    t = tensors()
    t["b.bias"][2] = value
    path = tmp_path / "damaged.safetensors"
    save_file(t, path)
    with pytest.raises(NonFiniteWeights, match=rf"damaged\.safetensors: key 'b\.bias': 1 of 5 values are NaN "
                                               r"or infinite; expected finite weights"):
        load_file(path)
    assert torch.isnan(load_file(path, check=False)["b.bias"][2]) == (value != value)   # opt-out loads as is


def test_check_finite_on_any_state_dict():
    sd = {f"layer{k}.weight": torch.full((2, 2), float("nan")) for k in range(5)}
    sd["ok"] = torch.ones(3)
    sd["ints"] = torch.tensor([1, 2])
    with pytest.raises(NonFiniteWeights, match=r"^model\.pt: key 'layer0\.weight': 4 of 4 values .*"
                                               r"key 'layer2\.weight'.*\(and 2 more keys\)"):
        check_finite(sd, "model.pt")
    check_finite({"ok": torch.ones(3), "ints": torch.tensor([1]), "empty": torch.empty(0)}, "fine.pt")


def test_truncated_file(tmp_path):
    save_file(tensors(), tmp_path / "ok.safetensors")
    whole = (tmp_path / "ok.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[:-6])
    with pytest.raises(SafetensorsError, match=r"cut\.safetensors: key '.*': data ends at byte \d+ but the file "
                                               r"has \d+ bytes \(truncated\?\)"):
        load_file(path)


F32_4 = {"dtype": "F32", "shape": [4]}   # 16 bytes


@pytest.mark.parametrize("offsets, size, message", [
    ([[0, 16], [8, 24]], 24, r"key 'y': data \[8, 24\] overlaps key 'x''s, which ends at 16"),
    ([[0, 16], [0, 16]], 16, r"overlaps key 'x''s"),
    ([[0, 16], [20, 36]], 36, r"key 'y': data starts at 20 but the previous tensor ends at 16; expected no gap"),
    ([[0, 16], [16, 32]], 40, r"the tensors' data ends at byte \d+ but the file has \d+ bytes; expected nothing "
                              r"after the last tensor"),
    ([[0, 16], [16, 28]], 28, r"key 'y': F32 \[4\] needs 16 bytes, header gives offsets \[16, 28\]"),
])
def test_bad_offsets_name_the_file_and_key(tmp_path, offsets, size, message):
    header = {"x": dict(F32_4, data_offsets=offsets[0]), "y": dict(F32_4, data_offsets=offsets[1])}
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(range(size)))
    with pytest.raises(SafetensorsError, match=rf"bad\.safetensors: .*{message}"):
        load_file(path)


def test_bad_header_entries(tmp_path):
    for entry, message in [({"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}, "bad header entry"),
                           ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "negative dimension"),
                           ({"dtype": "F32", "shape": [1]}, "bad header entry")]:
        path = write_raw(tmp_path / "h.safetensors", {"w": entry}, bytes(4))
        with pytest.raises(SafetensorsError, match=rf"h\.safetensors: key 'w': .*{message}"):
            load_file(path)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(tmp_path / "short.safetensors")
