"""The generated shapes dataset: deterministic, atomic, and its answers agree with its pixels.

The answers are re-derived here independently of `synthetic.questions`: a small pixel reader
recovers (cell, colour, kind) of every shape from the PNG, and a regex answerer answers each
question from that reading, requiring exactly one possible answer.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from minimind_v import synthetic
from minimind_v.synthetic import COLOURS, COUNTS, KINDS, POSITIONS, answer_words, make_dataset
from dataset_files import digest, read_jsonl


def read_scene(path):
    """PNG -> sorted [(cell, colour, kind)] recovered from pixels alone."""
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)     # (S, S, 3)
    size = px.shape[0]
    colours, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()]
    assert background[0] == background[1] == background[2] <= synthetic.MAX_BACKGROUND
    shapes = []
    for cell in range(9):
        row, col = divmod(cell, 3)
        y0, y1 = round(row * size / 3), round((row + 1) * size / 3)
        x0, x1 = round(col * size / 3), round((col + 1) * size / 3)
        patch = px[y0:y1, x0:x1]
        mask = (patch != background).any(-1)                         # (h, w)
        if not mask.any():
            continue
        rgb = patch[mask].mean(0)
        colour = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c][1]) - rgb).sum())
        ys, xs = np.nonzero(mask)
        box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        fill = box.mean()
        widths = box.sum(1)
        widest = np.flatnonzero(widths == widths.max()).mean() / (len(widths) - 1)   # 0 top .. 1 bottom
        if fill > 0.92:
            kind = "square"
        elif fill > 0.66:
            kind = "circle"
        else:
            kind = "triangle" if widest > 0.75 else "diamond"
        shapes.append((cell, colour, kind))
    return shapes


def answers_to(question, scene):
    """Every answer the read scene allows to an English or Chinese question."""
    pos_en = {p[0]: i for i, p in enumerate(POSITIONS)}
    pos_zh = {p[1]: i for i, p in enumerate(POSITIONS)}
    col_zh = {v[0]: k for k, v in COLOURS.items()}
    kind_zh = {v: k for k, v in KINDS.items()}
    en = not re.search(r"[\u4e00-\u9fff]", question)
    name = {"pos": lambda c: POSITIONS[c][0 if en else 1], "col": lambda c: c if en else COLOURS[c][0],
            "kind": lambda k: k if en else KINDS[k]}
    if question in ("How many shapes are there?", "图片里有几个图形？"):
        return {COUNTS[len(scene)][0 if en else 1]}
    patterns = [
        (r"What colour is the (\w+)\?|(.+)是什么颜色？", lambda m, s: s[2] == m, lambda s: name["col"](s[1])),
        (r"What shape is the (\w+) one\?|(.+)的图形是什么形状？", lambda m, s: s[1] == m, lambda s: name["kind"](s[2])),
        (r"Where is the (\w+) shape\?|(.+)的图形在哪里？", lambda m, s: s[1] == m, lambda s: name["pos"](s[0])),
        (r"Where is the (\w+)\?|(.+)在哪里？", lambda m, s: s[2] == m, lambda s: name["pos"](s[0])),
        (r"What is at the ([\w ]+)\?|(.+)是什么？", lambda m, s: s[0] == m,
         lambda s: f"{s[1]} {s[2]}" if en else COLOURS[s[1]][0] + KINDS[s[2]]),
    ]
    for pattern, matches, answer in patterns:
        m = re.fullmatch(pattern, question)
        if m:
            word = m.group(1) or m.group(2)
            key = (pos_en.get(word, word) if en else pos_zh.get(word, col_zh.get(word, kind_zh.get(word, word))))
            return {answer(s) for s in scene if matches(key, s)}
    raise AssertionError(f"unknown question {question!r}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "shapes"
    return make_dataset(out, n_train=300, n_test=60, seed=7, image_size=48)


def test_layout_and_seed_format(data):
    names = {p.name for p in data.iterdir()}
    assert names == {"images", "meta.json", "pretrain_train.jsonl", "pretrain_test.jsonl",
                     "sft_train.jsonl", "sft_test.jsonl"}
    assert len(list((data / "images").iterdir())) == 360
    for split, n in (("train", 300), ("test", 60)):
        for kind in ("pretrain", "sft"):
            recs = read_jsonl(data / f"{kind}_{split}.jsonl")
            assert len(recs) == n
            for r in recs:
                user, assistant = r["conversations"]
                assert (user["role"], assistant["role"]) == ("user", "assistant")
                assert user["content"].endswith("<image>") and user["content"].count("<image>") == 1
                assert (data / "images" / r["image"]).is_file() and r["image"].startswith(split)
    with Image.open(data / "images" / "test_000000.png") as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    again = make_dataset(tmp_path / "again", n_train=300, n_test=60, seed=7, image_size=48)
    assert digest(again) == digest(data)
    other = make_dataset(tmp_path / "other", n_train=300, n_test=60, seed=8, image_size=48)
    assert read_jsonl(other / "sft_train.jsonl") != read_jsonl(data / "sft_train.jsonl")
    # a smaller dataset is a prefix of a larger one
    small = make_dataset(tmp_path / "small", n_train=20, n_test=5, seed=7, image_size=48)
    assert read_jsonl(small / "sft_train.jsonl") == read_jsonl(data / "sft_train.jsonl")[:20]


def test_answers_agree_with_pixels(data):
    checked = 0
    for split in ("train", "test"):
        for r in read_jsonl(data / f"sft_{split}.jsonl"):
            scene = read_scene(data / "images" / r["image"])
            question = r["conversations"][0]["content"].removesuffix("<image>")
            possible = answers_to(question, scene)
            assert len(possible) == 1, f"{r['image']}: {question!r} has answers {possible} in {scene}"
            assert r["conversations"][1]["content"] == possible.pop(), f"{r['image']}: {question!r}, {scene}"
            checked += 1
    assert checked == 360


def test_captions_agree_with_pixels(data):
    for r in read_jsonl(data / "pretrain_train.jsonl")[:100]:
        scene = read_scene(data / "images" / r["image"])
        shapes = [synthetic.Shape(kind, colour, cell, 0, 0, 0) for cell, colour, kind in scene]
        assert r["conversations"][1]["content"] in (synthetic.caption(shapes, "en"), synthetic.caption(shapes, "zh"))


def test_question_mix(data):
    recs = read_jsonl(data / "sft_train.jsonl")
    assert {r["qtype"] for r in recs} == {"count", "colour", "kind", "position", "what"}
    assert {r["lang"] for r in recs} == {"en", "zh"}
    counts = {len(read_scene(data / "images" / r["image"])) for r in recs[:60]}
    assert counts == {1, 2, 3}


def test_every_answer_is_whole_pieces(data, tmp_path):
    from minimind_v.tokenizer import Tokenizer
    tok = Tokenizer.train([data / "sft_train.jsonl", data / "pretrain_train.jsonl"], tmp_path / "tok",
                          vocab_size=420, user_defined_symbols=answer_words())
    words = set(answer_words())
    answers = {r["conversations"][1]["content"] for s in ("train", "test") for r in read_jsonl(data / f"sft_{s}.jsonl")}
    assert len(answers) > 40
    for a in answers:
        pieces = [tok.id_to_piece(i) for i in tok.encode_content(a, num_patches=9)]
        assert all(p in words for p in pieces), f"{a!r} -> {pieces}"
        assert len(pieces) == len(a.split()) or not a.isascii()          # one piece per English word
        assert "".join(pieces).replace("▁", " ") == a


def test_atomic_and_overwrite(data, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        make_dataset(data, 1, 1, seed=7)
    target = tmp_path / "d"
    make_dataset(target, 3, 1, seed=1)
    make_dataset(target, 2, 1, seed=2, overwrite=True)
    assert len(read_jsonl(target / "sft_train.jsonl")) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp folders left
    with pytest.raises(ValueError, match="multiple of 3"):
        make_dataset(tmp_path / "e", 1, 1, image_size=50)
    assert not (tmp_path / "e").exists()


def test_cli(tmp_path, capsys):
    from minimind_v.cli import main
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--train", "4", "--test", "2", "--seed", "3"]) == 0
    assert len(read_jsonl(tmp_path / "c" / "sft_test.jsonl")) == 2
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["answer_words"] == answer_words()
