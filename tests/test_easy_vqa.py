"""benchmarks/easy_vqa.py: easy-VQA's layout (questions.json of [question, answer, image_id] and
images/<id>.png per split) becomes records our loader reads, one per question, nothing dropped;
a malformed entry or a missing picture stops it with the file and the index."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minimind_v.data import parse_record

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "easy_vqa.py"
spec = importlib.util.spec_from_file_location("easy_vqa_bench", SCRIPT)
easy_vqa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(easy_vqa)

QUESTIONS = {
    "train": [["what color is the shape?", "blue", 0], ["is there a red shape?", "no", 0],
              ["what is the brown shape?", "triangle", 1], ["does the image not contain a circle?", "yes", 1]],
    "test": [["what shape is present?", "circle", 0]],
}


def fake_source(root: Path, questions=QUESTIONS) -> Path:
    rng = np.random.default_rng(0)
    for split, qs in questions.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "questions.json").write_text(json.dumps(qs))
        for image_id in {q[2] for q in qs if isinstance(q, list) and len(q) == 3}:
            px = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / split / "images" / f"{image_id}.png")
    return root


def test_every_question_becomes_a_record_with_its_own_picture(tmp_path):
    src = fake_source(tmp_path / "src")
    counts = easy_vqa.convert(src, tmp_path / "out")
    assert counts == {"train": 4, "test": 1}
    for split, qs in QUESTIONS.items():
        lines = (tmp_path / "out" / f"sft_{split}.jsonl").read_text().splitlines()
        assert len(lines) == len(qs)
        for lineno, (line, (question, answer, image_id)) in enumerate(zip(lines, qs), 1):
            messages, paths, extra = parse_record(line, "x.jsonl", lineno, tmp_path / "out" / "images")
            assert messages[0]["content"] == question + "<image>" and messages[1]["content"] == answer
            assert paths == [tmp_path / "out" / "images" / f"{split}_{image_id}.png"]
            assert paths[0].read_bytes() == (src / split / "images" / f"{image_id}.png").read_bytes()
            assert extra["qtype"] == ("yesno" if answer in ("yes", "no") else
                                      "colour" if "color" in question else "shape")
    # the train and test picture 0 are different files and stay apart
    assert (tmp_path / "out/images/train_0.png").read_bytes() != (tmp_path / "out/images/test_0.png").read_bytes()


def test_a_malformed_entry_names_the_file_and_index(tmp_path):
    bad = {"train": [["what color is the shape?", "blue", 0], ["is there a red shape?", "no"]], "test": []}
    src = fake_source(tmp_path / "src", bad)
    with pytest.raises(easy_vqa.ConvertError, match=r"train[/\\]questions.json: entry 1 is .*expected"):
        easy_vqa.convert(src, tmp_path / "out")


def test_a_missing_picture_names_the_entry_and_the_path(tmp_path, capsys):
    src = fake_source(tmp_path / "src")
    (src / "train" / "images" / "1.png").unlink()
    assert easy_vqa.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "entry 2 names image 1" in err and "1.png does not exist" in err and "Traceback" not in err
