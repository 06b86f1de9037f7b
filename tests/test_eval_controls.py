"""The vision-reliance controls of `minimind-v eval`, on a tiny checkpoint trained by the CLI with a
recipe: each control equals running the model by hand on what that control shows, the shuffle is
a derangement, and the majority baseline equals a hand count."""
from __future__ import annotations

import json
import os
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from minimind_v.chat import PictureFeatures, grey_pixels, load_pixels, reply, user_message
from minimind_v.cli import main
from minimind_v.evaluation import (controls, majority_baseline, picture_derangement, question_baseline, read_answers,
                                   read_records)
from minimind_v.image import preprocess
from minimind_v.rundir import load_chat_model
from minimind_v.synthetic import make_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctl")
    os.environ["MINIMIND_V_CACHE"] = str(root / "cache")                  # the matmul peak, not in ~/.cache
    data = make_dataset(root / "data", n_train=64, n_test=16, seed=3, image_size=48, questions_per_image=1)
    assert main(["tokenizer", "train", str(data / "sft_train.jsonl"), "--out", str(root / "tok"),
                 "--vocab-size", "420", "--answer-words"]) == 0
    assert main(["train", "--stage", "sft", "--recipe", "smoke", "--data", str(data / "sft_train.jsonl"),
                 "--images", str(data / "images"), "--tokenizer", str(root / "tok.model"), "--out", str(root / "run"),
                 "--max-steps", "30", "--lr", "5e-3", "--eval-data", str(data / "sft_test.jsonl")]) == 0
    model, tok, _ = load_chat_model(root / "run")
    yield root, data, model, tok
    os.environ.pop("MINIMIND_V_CACHE", None)


def records(data):
    return [json.loads(x) for x in (data / "sft_test.jsonl").read_text(encoding="utf-8").splitlines()]


def test_blank_shuffled_and_none_equal_the_model_run_by_hand(trained):
    root, data, model, tok = trained
    res = controls(model, tok, data / "sft_test.jsonl", data / "images", seed=5, max_new_tokens=4)
    recs = records(data)
    names = [r["image"] for r in recs]
    grey = preprocess(Image.new("RGB", (48, 48), (128, 128, 128)), 48)
    assert torch.equal(grey_pixels(48), grey) and grey.flatten(1).std(dim=1).max() == 0   # constant per channel
    shuffled = picture_derangement([[data / "images" / n] for n in names], seed=5)
    for k, rec in enumerate(recs):
        q = rec["conversations"][0]["content"]
        real = reply(model, tok, [user_message(q, 1)], load_pixels([data / "images" / rec["image"]], 48), 4)
        blank = reply(model, tok, [user_message(q, 1)], grey[None], 4)
        other = reply(model, tok, [user_message(q, 1)], load_pixels(shuffled[k], 48), 4)
        alone = reply(model, tok, [user_message(q.replace("<image>", ""), 0)], None, 4)
        assert res["real"]["examples"][k][3] == real.strip()
        assert res["blank"]["examples"][k][3] == blank.strip()
        assert res["shuffled"]["examples"][k][3] == other.strip()
        assert res["shuffled"]["examples"][k][0] == [str(shuffled[k][0])] != [str(data / "images" / rec["image"])]
        assert res["none"]["examples"][k][3] == alone.strip() and res["none"]["examples"][k][0] == []
    assert res["image_gain"] == res["real"]["accuracy"] - res["blank"]["accuracy"]
    assert res["shuffled_gain"] == res["real"]["accuracy"] - res["shuffled"]["accuracy"]
    assert len({ex[3] for ex in res["real"]["examples"]}) > 1          # a model that says something varied


def test_picture_features_encode_each_file_once_within_the_budget(trained, monkeypatch):
    _, data, model, _ = trained
    names = [data / "images" / r["image"] for r in records(data)]
    shown = [[names[0]], [names[1]], [names[0]], [names[2]]]                     # a picture shown twice
    calls = []
    encode = model.image_features
    monkeypatch.setattr(model, "image_features", lambda px: calls.append(px.shape[0]) or encode(px))
    memo = PictureFeatures(model)
    out = memo.batch(shown)                                                      # (4, 1, P, Dv)
    want = encode(torch.stack([load_pixels(x, 48) for x in shown]))              # (4, 1, P, Dv), by hand
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-6)
    assert calls == [3] and len(memo.kept) == 3                                  # three files, one batch
    assert torch.equal(memo.batch([[names[1]], [names[0]]]), out[[1, 0]]) and calls == [3]   # kept: no encode
    tight = PictureFeatures(model, max_bytes=0)                                  # nothing fits: still right
    assert torch.allclose(tight.batch(shown), want, atol=1e-6) and not tight.kept and tight.bytes == 0
    tight.batch(shown[:1])
    assert calls == [3, 3, 1]


def test_derangement_never_keeps_a_picture():
    shown = [[f"img{i % 7}.png"] for i in range(20)] + [["a.png", "b.png"], ["c.png", "d.png"]] + [[]]
    for seed in range(50):
        out = picture_derangement(shown, seed)
        assert all(o != s for o, s in zip(out, shown) if s)                         # no record keeps its own
        assert out[-1] == [] and sorted(map(tuple, out[20:22])) == [("a.png", "b.png"), ("c.png", "d.png")]
        # records that shared a picture still share one (a permutation of the distinct pictures)
        assert len({tuple(out[i]) for i in range(20) if i % 7 == 3}) == 1
        assert sorted({tuple(o) for o in out[:20]}) == sorted({tuple(s) for s in shown[:20]})
    assert picture_derangement(shown, 1) == picture_derangement(shown, 1) != picture_derangement(shown, 2)
    # Fisher-Yates (allowing j == i) would keep some pictures in place for some seed
    def fisher_yates(n, seed):
        rng, p = random.Random(seed), list(range(n))
        for i in range(n - 1, 0, -1):
            j = rng.randrange(i + 1)
            p[i], p[j] = p[j], p[i]
        return p
    assert any(any(p[i] == i for i in range(7)) for p in (fisher_yates(7, s) for s in range(50)))


def test_majority_baseline_equals_a_hand_count(trained):
    _, data, _, _ = trained
    train = [json.loads(x) for x in (data / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()]
    test = records(data)
    best = {}
    for qtype in {r["qtype"] for r in train}:
        counts = Counter(r["conversations"][-1]["content"] for r in train if r["qtype"] == qtype)
        top = max(counts.values())
        best[qtype] = sorted(a for a, c in counts.items() if c == top)[0]
    hits = sum(best.get(r["qtype"]) == r["conversations"][-1]["content"] for r in test)
    res = majority_baseline(read_answers(data / "sft_test.jsonl"), read_answers(data / "sft_train.jsonl"))
    assert res["answers"] == best and res["correct"] == hits and res["total"] == len(test)
    # from the scored split itself, with a tie broken by sorted order
    tiny = [("yesno", "yes"), ("yesno", "no"), ("count", "3"), ("count", "3"), ("count", "2")]
    r = majority_baseline(tiny)
    assert r["answers"] == {"yesno": "no", "count": "3"} and r["correct"] == 3
    assert r["by_type"] == {"count": (2, 3), "yesno": (1, 2)}


def test_question_baseline_equals_a_hand_count(trained):
    _, data, _, _ = trained
    train, test = (read_records(data / f"sft_{s}.jsonl") for s in ("train", "test"))
    assert all("<image>" not in q and q == q.strip() for _, q, _ in train + test)
    by_question = {}
    for _, q, a in train:
        by_question.setdefault(q, Counter())[a] += 1
    type_major = majority_baseline([(t, a) for t, _, a in test], [(t, a) for t, _, a in train])["answers"]
    hits = 0
    for qtype, q, a in test:
        if q in by_question:
            top = max(by_question[q].values())
            guess = sorted(x for x, c in by_question[q].items() if c == top)[0]
        else:
            guess = type_major[qtype]
        hits += guess == a
    res = question_baseline(test, train)
    assert res["correct"] == hits and res["total"] == len(test)
    # the words carry the answer: per question text beats per type, and an unseen question falls back to its type
    rows = [("yesno", "is it red?", "no"), ("yesno", "is it red?", "no"), ("yesno", "is it round?", "yes"),
            ("yesno", "is it round?", "yes"), ("yesno", "is it round?", "yes"), ("colour", "what colour?", "red")]
    r = question_baseline(rows)
    assert r["correct"] == 6 and majority_baseline([(t, a) for t, _, a in rows])["correct"] == 4
    r = question_baseline([("yesno", "is it blue?", "yes"), ("yesno", "is it red?", "yes")], rows)
    assert r["answers"]["is it red?"] == "no" and r["correct"] == 1          # blue: unseen -> the type's "yes"


def test_eval_cli_prints_the_gain_first_and_says_where_the_majority_came_from(trained, capsys):
    root, data, _, _ = trained
    args = ["eval", "--checkpoint", str(root / "run"), "--data", str(data / "sft_test.jsonl"), "--images",
            str(data / "images"), "--max-new-tokens", "4", "--show", "0"]
    assert main(args + ["--train-data", str(data / "sft_train.jsonl")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("image gain (real - blank):") and "(real - shuffled: " in out[0]
    assert out[1].split() == ["qtype", "n", "real", "blank", "shuffled", "none", "majority", "question"]
    assert any(line.startswith("all ") for line in out) and "training split" in out[-3]
    assert out[-2].startswith("the words alone answer ") and "real - question: " in out[-2]
    assert main(args) == 0
    assert "scored split" in capsys.readouterr().out


def test_train_wrote_a_report_with_its_pictures(trained):
    root, *_ = trained
    text = (root / "run" / "report.md").read_text()
    for part in ("Throughput and MFU", "MFU", "Does it look at the picture?", "image gain", "Where the answer looked"):
        assert part in text, part
    import re
    for png in re.findall(r"\((report/[\w.]+\.png)\)", text):
        with Image.open(root / "run" / png) as im:
            assert im.size[0] > 100, png
    assert "report/attention_0.png" in text and "report/accuracy.png" in text
