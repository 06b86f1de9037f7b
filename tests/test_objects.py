"""The held-out objects dataset: deterministic, atomic, and every caption and answer agrees with
the saved picture, read back here from its pixels (each colour's pixels, their bounding box's
centre, and the shape from how much of that box they fill)."""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from minimind_v import objects
from minimind_v.objects import COLOURS, make_dataset
from dataset_files import digest, read_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ob") / "objects", n_train=160, n_test=40, seed=3)


def read_picture(path):
    """{colour: (shape, x, y)} seen in the picture: a plain grey background and one solid blob per colour."""
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    bg = px[0, 0]
    assert bg[0] == bg[1] == bg[2] and 100 <= bg[0] <= 240
    found, covered = {}, np.all(px == bg, axis=-1)
    for name, rgb in COLOURS.items():
        mask = np.all(px == rgb, axis=-1)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        fill = mask.sum() / ((x1 - x0 + 1) * (y1 - y0 + 1))
        assert abs((x1 - x0) - (y1 - y0)) <= 1 and x1 - x0 >= 6, (path, name)      # about square, not tiny
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle" if fill > 0.4 else None
        assert shape, (path, name, fill)              # a fill below 0.4: two blobs of a colour, or a broken one
        found[name] = (shape, (x0 + x1) / 2, (y0 + y1) / 2)
        covered |= mask
    assert covered.all(), path                        # nothing but the background and the objects
    return found


def where(x, y, size):
    """Thirds of the picture, as the caption words them."""
    row, col = int(y * 3 // size), int(x * 3 // size)
    return {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
            (1, 0): "on the left", (1, 1): "near the centre", (1, 2): "on the right",
            (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}[row, col]


READER = [   # qtype, the phrasings as one pattern (group 1: the colour or shape asked about)
    ("shape", r"(?:What shape is the (\w+) object|What is the shape of the (\w+) one|"
              r"Which shape does the (\w+) object have)\?"),
    ("leftside", r"(?:Is the (\w+) object on the left side of the picture|Is the (\w+) object in the left half|"
                 r"Is the (\w+) one on the left)\?"),
    ("top", r"(?:Is the (\w+) object in the top half|Is the (\w+) object in the upper half|"
            r"Is the (\w+) one in the top half of the picture)\?"),
    ("closest", r"(?:What shape is the object closest to the (\w+) one|"
                r"What shape is the object nearest to the (\w+) object|Which shape is closest to the (\w+) object)\?"),
    ("furthest", r"(?:What shape is the object (?:furthest|farthest) from the (\w+) (?:one|object)|"
                 r"Which shape is furthest from the (\w+) object)\?"),
    ("count", r"(?:How many objects have the same shape as the (\w+) one|"
              r"How many objects share the shape of the (\w+) object|"
              r"Counting the (\w+) object itself, how many objects have its shape)\?"),
    ("colourof", r"(?:What colour is the (\w+) nearest the top|What colour is the highest (\w+))\?"),
]


def answer(question, seen, size):
    """(qtype, the one answer the picture allows), derived here from the pixels' facts."""
    for qtype, pattern in READER:
        if m := re.fullmatch(pattern, question):
            break
    else:
        raise AssertionError(f"unknown question {question!r}")
    asked = next(g for g in m.groups() if g)
    if qtype == "colourof":
        ys = sorted((y, c) for c, (s, _, y) in seen.items() if s == asked)
        assert len(ys) == 1 or ys[1][0] - ys[0][0] >= 1        # never ambiguous
        return qtype, ys[0][1]
    shape, x, y = seen[asked]
    if qtype == "shape":
        return qtype, shape
    if qtype in ("leftside", "top"):
        pos = x if qtype == "leftside" else y
        assert abs(pos - size / 2) >= 1
        return qtype, "yes" if pos < size / 2 else "no"
    if qtype == "count":
        return qtype, str(sum(s == shape for s, _, _ in seen.values()))
    d = sorted((math.dist((x, y), (ux, uy)), s) for c, (s, ux, uy) in seen.items() if c != asked)
    if qtype == "furthest":
        d.reverse()
    assert len(d) == 1 or abs(d[0][0] - d[1][0]) >= 1         # no near tie
    return qtype, d[0][1]


def test_layout_determinism_and_prefix(data, tmp_path):
    assert {p.name for p in data.iterdir()} == {"images", "meta.json", "pretrain_train.jsonl", "pretrain_test.jsonl",
                                                 "sft_train.jsonl", "sft_test.jsonl"}
    assert len(list((data / "images").iterdir())) == 200
    with Image.open(data / "images" / "train_000000.png") as im:
        assert im.size == (75, 75)
    again = make_dataset(tmp_path / "again", n_train=160, n_test=40, seed=3)
    assert digest(again) == digest(data)
    small = make_dataset(tmp_path / "small", n_train=20, n_test=5, seed=3)
    for name in ("sft_train.jsonl", "pretrain_train.jsonl", "sft_test.jsonl"):
        assert read_jsonl(small / name) == read_jsonl(data / name)[:len(read_jsonl(small / name))]
    assert (small / "images" / "test_000004.png").read_bytes() == (data / "images" / "test_000004.png").read_bytes()
    assert (data / "images" / "test_000000.png").read_bytes() != (data / "images" / "train_000000.png").read_bytes()
    other = make_dataset(tmp_path / "other", n_train=20, n_test=5, seed=4)
    assert read_jsonl(other / "pretrain_train.jsonl") != read_jsonl(small / "pretrain_train.jsonl")
    with pytest.raises(FileExistsError):
        make_dataset(data, 1, 1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_caption_agrees_with_the_pixels(data):
    for split in ("train", "test"):
        for cap in read_jsonl(data / f"pretrain_{split}.jsonl"):
            seen = read_picture(data / "images" / cap["image"])
            assert len(seen) == 6
            text = cap["conversations"][1]["content"]
            items = re.findall(r"an? (\w+) (\w+) ((?:at|on|near) the [a-z ]+?)(?:,|\.$)", text)
            assert len(items) == 6 and text.count(",") == 5, text
            assert {c: (s, w) for c, s, w in items} == {c: (s, where(x, y, 75)) for c, (s, x, y) in seen.items()}
            order = [(int(seen[c][2] * 3 // 75), seen[c][1]) for c, _, _ in items]     # reading order
            assert order == sorted(order), text


def test_every_answer_follows_from_the_pixels(data):
    for split in ("train", "test"):
        for q in read_jsonl(data / f"sft_{split}.jsonl"):
            seen = read_picture(data / "images" / q["image"])
            question = q["conversations"][0]["content"]
            assert question.endswith("<image>") and question.count("<image>") == 1
            got = answer(question.removesuffix("<image>"), seen, 75)
            assert got == (q["qtype"], q["conversations"][1]["content"]), (q, seen)


def test_question_mix_and_answer_words(data):
    recs = read_jsonl(data / "sft_train.jsonl") + read_jsonl(data / "sft_test.jsonl")
    mix = Counter(r["qtype"] for r in recs)
    assert set(mix) == set(objects.QTYPES) and min(mix.values()) >= len(recs) / len(objects.QTYPES) / 2, mix
    for qtype in ("leftside", "top"):
        assert {r["conversations"][1]["content"] for r in recs if r["qtype"] == qtype} == {"yes", "no"}
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["generator"], meta["n_objects"], meta["image_size"]) == ("objects", 6, 75)
    assert meta["answer_words"] == objects.answer_words()
    answers = {r["conversations"][1]["content"] for r in recs}
    assert answers <= set(meta["answer_words"])
    assert set(objects.SHAPES) | {"yes", "no", "1", "2"} <= answers


def test_other_settings_and_cli(tmp_path, capsys):
    from minimind_v.cli import main
    assert main(["data", "objects", "--out", str(tmp_path / "c"), "--train", "12", "--test", "3",
                 "--image-size", "96", "--objects", "3", "--seed", "1"]) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert (meta["image_size"], meta["n_objects"], meta["seed"], meta["n_train"]) == (96, 3, 1, 12)
    for q in read_jsonl(tmp_path / "c" / "sft_train.jsonl"):
        seen = read_picture(tmp_path / "c" / "images" / q["image"])
        assert len(seen) == 3
        assert answer(q["conversations"][0]["content"].removesuffix("<image>"), seen, 96)[1] == \
            q["conversations"][1]["content"]
    assert main(["data", "objects", "--out", str(tmp_path / "e"), "--train", "1", "--test", "1",
                 "--objects", "7"]) == 2
    assert "n_objects" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("kwargs, words", [({"n_objects": 1}, "n_objects must be 2..6"),
                                           ({"n_objects": 7}, "n_objects must be 2..6"),
                                           ({"image_size": 40}, "image_size must be 45..512"),
                                           ({"n_train": -1}, "numbers of pictures")])
def test_bad_arguments(tmp_path, kwargs, words):
    args = {"n_train": 2, "n_test": 1, **kwargs}
    with pytest.raises(ValueError, match=words):
        make_dataset(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()
