"""The glyph-board dataset: deterministic, atomic, its pixels agree with its captions, and every
answer follows from the caption by an independent reader (regexes written here)."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from minimind_v import scenes
from minimind_v.scenes import COLOURS, make_dataset
from dataset_files import digest, read_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sc") / "boards", n_train=400, n_test=50, seed=4)


def parse_caption(text):
    """'a teal 2 at row 2, column 4; ...' -> [(char, colour, row, col)]"""
    items = re.findall(r"an? (\w+) (\w) at row (\d), column (\d)", text)
    assert len(items) == text.count(";") + 1, text
    return [(c, col, int(r) - 1, int(k) - 1) for col, c, r, k in items]


def answer(question, board):
    """The one answer the board allows, derived here from the caption's facts."""
    chars = {c: (col, r, k) for c, col, r, k in board}
    if m := re.fullmatch(r"How many (?:digit|letter)s (?:are there|can you see)\?", question):
        return str(len(board))
    if m := re.fullmatch(r"How many (\w+) (?:digit|letter)s are there\?", question):
        return str(sum(col == m.group(1) for _, col, _, _ in board))
    if m := re.fullmatch(r"(?:Is there a|Does the picture contain a) (\w)\?", question):
        return "yes" if m.group(1) in chars else "no"
    if m := re.fullmatch(r"Is the (\w) (left of|to the right of|above|below) the (\w)\?", question):
        (_, ra, ca), (_, rb, cb) = chars[m.group(1)], chars[m.group(3)]
        rel = {"left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[m.group(2)]
        assert (ca != cb) if "left" in m.group(2) or "right" in m.group(2) else (ra != rb)   # never ambiguous
        return "yes" if rel else "no"
    if m := re.fullmatch(r"(?:What colour is the|Which colour does the) (\w)(?: have)?\?", question):
        return chars[m.group(1)][0]
    if m := re.fullmatch(r"Which (?:digit|letter) is (\w+)\?", question):
        hits = [c for c, (col, _, _) in chars.items() if col == m.group(1)]
        assert len(hits) == 1
        return hits[0]
    raise AssertionError(f"unknown question {question!r}")


def test_layout_determinism_and_prefix(data, tmp_path):
    assert {p.name for p in data.iterdir()} == {"images", "meta.json", "pretrain_train.jsonl", "pretrain_test.jsonl",
                                                 "sft_train.jsonl", "sft_test.jsonl"}
    with Image.open(data / "images" / "train_000000.png") as im:
        assert im.size == (64, 64)
    again = make_dataset(tmp_path / "again", n_train=400, n_test=50, seed=4)
    assert digest(again) == digest(data)
    small = make_dataset(tmp_path / "small", n_train=30, n_test=5, seed=4)
    assert read_jsonl(small / "sft_train.jsonl") == read_jsonl(data / "sft_train.jsonl")[:30]
    other = make_dataset(tmp_path / "other", n_train=30, n_test=5, seed=5)
    assert read_jsonl(other / "sft_train.jsonl") != read_jsonl(small / "sft_train.jsonl")
    with pytest.raises(FileExistsError):
        make_dataset(data, 1, 1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_every_answer_follows_from_the_caption(data):
    for split in ("train", "test"):
        for cap, q in zip(read_jsonl(data / f"pretrain_{split}.jsonl"), read_jsonl(data / f"sft_{split}.jsonl")):
            assert cap["image"] == q["image"]
            board = parse_caption(cap["conversations"][1]["content"])
            question = q["conversations"][0]["content"].removesuffix("<image>")
            assert q["conversations"][1]["content"] == answer(question, board), (q, board)


def test_pixels_agree_with_the_caption(data):
    for cap in read_jsonl(data / "pretrain_train.jsonl")[:80]:
        px = np.asarray(Image.open(data / "images" / cap["image"]).convert("RGB")).astype(int)
        bg = px[0, 0]
        board = {(r, c): col for _, col, r, c in parse_caption(cap["conversations"][1]["content"])}
        for r in range(4):
            for c in range(4):
                cell = px[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].reshape(-1, 3)
                ink = cell[np.abs(cell - bg).sum(1) > 60]
                if (r, c) not in board:
                    assert len(ink) == 0, (cap["image"], r, c)
                    continue
                assert len(ink) > 10
                colours, counts = np.unique(ink, axis=0, return_counts=True)
                main = colours[counts.argmax()]
                assert min(COLOURS, key=lambda k: np.abs(np.array(COLOURS[k]) - main).sum()) == board[(r, c)]


def test_question_mix_and_balance(data):
    recs = read_jsonl(data / "sft_train.jsonl")
    assert {r["qtype"] for r in recs} == set(scenes.QTYPES)
    yes_no = Counter(r["conversations"][1]["content"] for r in recs if r["qtype"] in ("exists", "leftright", "updown"))
    assert set(yes_no) == {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) < 0.2 * sum(yes_no.values())
    words = set(scenes.answer_words())
    assert {r["conversations"][1]["content"] for r in recs} <= words


def test_other_settings_and_cli(tmp_path):
    from minimind_v.cli import main
    assert main(["data", "scenes", "--out", str(tmp_path / "c"), "--train", "6", "--test", "2", "--image-size", "72",
                 "--grid", "3", "--glyphs", "letters", "--background", "dark"]) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert (meta["image_size"], meta["glyphs"], meta["grid"]) == (72, "letters", 3)
    recs = read_jsonl(tmp_path / "c" / "sft_train.jsonl")
    assert all(r["conversations"][1]["content"] in scenes.answer_words("letters", "dark") for r in recs)
    with Image.open(tmp_path / "c" / "images" / "test_000001.png") as im:
        assert im.size == (72, 72) and np.asarray(im)[0, 0].max() <= 50
    assert main(["data", "scenes", "--out", str(tmp_path / "e"), "--train", "1", "--test", "1", "--grid", "9"]) == 2
