"""Grades lessons/09-data/exercise.py (or minimind_v with --reference)."""
from __future__ import annotations

import random

import pytest
import torch

from minimind_v.tokenizer import Tokenizer

PAD = 3


def test_truncate_keeps_whole_images(ex):
    ids = [7, 8, PAD, PAD, PAD, 9, PAD, PAD, PAD, PAD, PAD, PAD, 10]    # images of 3: one, then two adjacent
    target = [False] * 12 + [True]
    for max_length, keep, images in ((100, 13, 3), (4, 2, 0), (5, 5, 1), (11, 9, 2), (12, 12, 3)):
        got = ex.truncate(ids, target, max_length, PAD, 3)
        assert got == (ids[:keep], target[:keep], images), (
            f"max_length={max_length}: got {len(got[0])} ids and {got[2]} images, expected {keep} ids and {images} "
            f"images ({ids}: images of 3 placeholders; a cut inside an image moves before that image)")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("l09")
    rng = random.Random(2)
    words = "what colour is the circle red blue 红色 圆形 在 左上".split()
    (tmp / "c.txt").write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(300)), encoding="utf-8")
    return Tokenizer.train([tmp / "c.txt"], tmp / "t", vocab_size=320)


def test_encode_sample_labels(ex, tok):
    msgs = [{"role": "user", "content": "What colour is the circle?<image>"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "红色 在 左上？"},
            {"role": "assistant", "content": "圆形"}]
    ids, labels, n = ex.encode_sample(tok, msgs, max_length=500, num_patches=4)
    assert n == 1 and len(ids) == len(labels) and ids.count(tok.image_pad_id) == 4
    assert ids == tok.encode_conversation(msgs, 4)[0]
    kept = [i for i, l in zip(ids, labels) if l != -100]
    assert kept == [l for l in labels if l != -100]              # labels equal the ids where kept
    assert tok.decode(kept) == "red<|im_end|>圆形<|im_end|>"
    short, short_labels, n_short = ex.encode_sample(tok, msgs, max_length=10, num_patches=4)
    assert n_short == 0 and short == ids[:len(short)] and len(short) <= 10
    assert all(l == -100 for l in short_labels)


def test_collate(ex):
    def item(t, n, seed):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(5, 50, (t,), generator=g),
                "labels": torch.randint(5, 50, (t,), generator=g),
                "pixel_values": torch.randn(n, 3, 8, 8, generator=g), "image_paths": [f"{seed}-{k}" for k in range(n)]}
    items = [item(5, 1, 0), item(9, 2, 1), item(2, 0, 2)]
    b = ex.collate(items, pad_id=0)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, 9)
    assert b["pixel_values"].shape == (3, 2, 3, 8, 8)
    assert b["image_counts"].tolist() == [1, 2, 0]
    assert b["image_paths"] == [["0-0"], ["1-0", "1-1"], []]
    assert torch.equal(b["input_ids"][0], torch.cat([items[0]["input_ids"], torch.zeros(4, dtype=torch.long)]))
    assert torch.equal(b["labels"][2], torch.cat([items[2]["labels"], torch.full((7,), -100)]))
    assert b["attention_mask"].dtype == torch.bool, f"attention_mask is {b['attention_mask'].dtype}, expected bool"
    assert b["attention_mask"].sum(1).tolist() == [5, 9, 2], "attention_mask is True exactly on the real tokens"
    assert torch.equal(b["pixel_values"][1], items[1]["pixel_values"])
    assert torch.equal(b["pixel_values"][0, 0], items[0]["pixel_values"][0]) and (b["pixel_values"][0, 1] == 0).all()
