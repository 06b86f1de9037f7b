"""VLMDataset reads Parquet files in upstream MiniMind-V's layout (columns `conversations`, a JSON
string of turns, and `image_bytes`, the picture file's bytes or a list of them), with the same
checks and bad-input policy as JSONL; a bad row is named by file and row number."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minimind_v.data import IGNORE, BadRecord, VLMDataset, collate
from minimind_v.image import read_pixels

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from test_data import tok, shapes, check_item  # noqa: E402,F401  (the shared tokenizer fixture)


def png_bytes(seed: int, size=(40, 30), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def turns(q="What colour?<image>", a="red"):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def write_parquet(path, rows: list[dict], list_images: bool = False, row_group_size: int | None = None):
    """rows: {"conversations": list or str, "image_bytes": bytes | list | None, ...} -> upstream's layout."""
    table = {"conversations": [r["conversations"] if isinstance(r["conversations"], str)
                               else json.dumps(r["conversations"], ensure_ascii=False) for r in rows]}
    images = [r.get("image_bytes") for r in rows]
    table["image_bytes"] = pa.array(images, type=pa.list_(pa.binary()) if list_images else pa.binary())
    for key in rows[0]:
        if key not in ("conversations", "image_bytes"):
            table[key] = [r.get(key) for r in rows]
    pq.write_table(pa.table(table), path, row_group_size=row_group_size)
    return path


def test_upstream_layout_reads_like_jsonl(tmp_path, tok):
    blobs = [png_bytes(k) for k in range(5)]
    rows = [{"conversations": turns(a=f"answer {k}"), "image_bytes": blobs[k], "lang": "en"} for k in range(5)]
    path = write_parquet(tmp_path / "sft_i2t.parquet", rows, row_group_size=2)      # three row groups
    ds = VLMDataset(path, None, tok, max_length=64, num_patches=4, image_size=16)
    assert len(ds) == 5
    for k in [4, 0, 3, 1, 2]:                                                       # any order
        item = ds[k]
        check_item(item, tok, rows[k]["conversations"], 4)
        assert torch.equal(item["pixel_values"][0], read_pixels("x", 16, data=blobs[k]))
        assert item["image_paths"] == [f"{path}#row{k}/0"]
        assert ds.samples[k].lineno == k and ds.samples[k].extra == {"lang": "en"}


def test_several_images_as_a_list_and_text_only_placeholders(tmp_path, tok):
    blobs = [png_bytes(k, fmt="JPEG") for k in range(3)]
    rows = [{"conversations": turns(q="<image>left or<image>right?", a="left"), "image_bytes": blobs[:2]},
            {"conversations": turns(q="Hello there", a="Hi"), "image_bytes": [blobs[2]]},  # upstream's t2t row
            {"conversations": turns(q="Hello again", a="Hi"), "image_bytes": None}]
    path = write_parquet(tmp_path / "mixed.parquet", rows, list_images=True)
    with pytest.warns(UserWarning, match=r"1 picture\(s\) of rows without <image> left unused"):
        ds = VLMDataset(path, None, tok, max_length=64, num_patches=4, image_size=16)
    assert len(ds) == 3 and ds.unused_images == 1
    two = ds[0]
    assert two["pixel_values"].shape == (2, 3, 16, 16)
    for k in range(2):
        assert torch.equal(two["pixel_values"][k], read_pixels("x", 16, data=blobs[k]))
    assert ds[1]["pixel_values"].shape == (0, 3, 16, 16) and ds[1]["image_paths"] == []
    assert ds.samples[1].images == []
    batch = collate([ds[1], ds[2]])                                                 # a text-only batch
    assert batch["pixel_values"].shape == (2, 0, 3, 16, 16)
    assert ((batch["labels"] != IGNORE).sum(1) > 0).all()


BAD_ROWS = {   # case -> (row, reason, message)
    "malformed JSON": ({"conversations": "[{", "image_bytes": None}, "malformed JSON", "'conversations' is malformed JSON"),
    "bad turns": ({"conversations": turns(a=" "), "image_bytes": None}, "bad turns", "turn 1: empty content"),
    "count mismatch": ({"conversations": turns(q="<image><image>"), "image_bytes": "ok"}, "image count mismatch",
                       "2 <image> placeholder(s) but 1 image(s) in 'image_bytes'"),
    "missing image": ({"conversations": turns(), "image_bytes": None}, "image count mismatch",
                      "1 <image> placeholder(s) but 0 image(s)"),
    "corrupt image": ({"conversations": turns(), "image_bytes": b"\x89PNG\r\n\x1a\n broken"}, "image unreadable",
                      "#row2/0: cannot be read as a picture"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_and_row(tmp_path, tok, case):
    row, _, message = BAD_ROWS[case]
    ok = {"conversations": turns(), "image_bytes": png_bytes(0)}
    bad = dict(row, image_bytes=png_bytes(1) if row["image_bytes"] == "ok" else row["image_bytes"])
    path = write_parquet(tmp_path / "bad.parquet", [ok, ok, bad, ok])              # the bad one is row 2
    with pytest.raises(BadRecord) as err:
        VLMDataset(path, None, tok, max_length=64, num_patches=4, image_size=16)
    assert str(err.value).startswith(f"{path}: row 2: ") and message in str(err.value)


def test_skip_bad_counts_bad_rows(tmp_path, tok):
    ok = {"conversations": turns(), "image_bytes": png_bytes(0)}
    rows = [ok] + [dict(r, image_bytes=png_bytes(1) if r["image_bytes"] == "ok" else r["image_bytes"])
                   for r, _, _ in BAD_ROWS.values()] + [ok]
    path = write_parquet(tmp_path / "mixed.parquet", rows)
    with pytest.warns(UserWarning, match=rf"kept 2 of {2 + len(BAD_ROWS)} records.*the first 5: .*: row 1: "):
        ds = VLMDataset(path, None, tok, max_length=64, num_patches=4, image_size=16, skip_bad=True)
    assert [s.lineno for s in ds.samples] == [0, len(rows) - 1]
    want = {}
    for _, reason, _ in BAD_ROWS.values():
        want[reason] = want.get(reason, 0) + 1
    assert dict(ds.skipped) == want


def test_missing_column_and_missing_pyarrow(tmp_path, tok, monkeypatch):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": ["hi"]}), path)
    with pytest.raises(ValueError, match=r"other\.parquet: no column 'conversations' \(columns: \['text'\]\)"):
        VLMDataset(path, None, tok, 64, 4, 16)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)                      # as if not installed
    with pytest.raises(ImportError, match=r"other\.parquet: reading a \.parquet dataset needs pyarrow "
                                          r"\(pip install 'minimind-v\[parquet\]'"):
        VLMDataset(path, None, tok, 64, 4, 16)
