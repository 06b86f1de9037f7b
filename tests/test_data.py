"""VLMDataset and collate: upstream MiniMind-V's records parse, labels cover exactly the assistant replies,
truncation never splits an image, and every kind of bad record is reported or counted."""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from minimind_v.data import IGNORE, SHOWN_SKIPS, BadRecord, Sample, VLMDataset, collate, truncate
from minimind_v.image import preprocess
from minimind_v.synthetic import answer_words, make_dataset
from minimind_v.tokenizer import EOS, IMAGE_PAD, Tokenizer

UPSTREAM_RECORDS = [   # the two example records of upstream MiniMind-V's dataset notes, verbatim
    {"conversations": [{"role": "user", "content": "提供给定图像的简要描述。\n<image>"},
                       {"role": "assistant", "content": "橄榄油是自由使用的健康成分。"}],
     "image": "GCC_train_002582585.jpg"},
    {"conversations": [{"role": "user", "content": "闹钟的位置对睡眠质量有什么影响？<image>"},
                       {"role": "assistant", "content": "把数字闹钟放在床头柜..."}],
     "image": "train-00000-of-00001_image_0_0.jpg"},
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def picture(path, mode="RGB", size=(40, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(rgb).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d") / "shapes", n_train=40, n_test=10, seed=3)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, shapes):
    tmp = tmp_path_factory.mktemp("tok")
    upstream = write_jsonl(tmp / "upstream.jsonl", UPSTREAM_RECORDS * 5)
    return Tokenizer.train([shapes / "sft_train.jsonl", shapes / "pretrain_train.jsonl", upstream], tmp / "t",
                           vocab_size=480, user_defined_symbols=answer_words())


def runs_of(ids, pad):
    """Lengths of the runs of `pad` in `ids`, left to right."""
    return [len(m) for m in re.findall(r"p+", "".join("p" if i == pad else "." for i in ids))]


def check_item(item, tok, messages, num_patches):
    """Labels spell exactly the assistant replies + <|im_end|>, and agree with input_ids there."""
    ids, labels = item["input_ids"], item["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    on = labels != IGNORE
    assert torch.equal(labels[on], ids[on])
    want = "".join(m["content"] + EOS for m in messages if m["role"] == "assistant")
    assert tok.decode(ids[on].tolist()) == want
    n_images = sum(m["content"].count("<image>") for m in messages)
    assert runs_of(ids.tolist(), tok.image_pad_id) == [num_patches] * n_images
    assert item["pixel_values"].shape[0] == n_images == len(item["image_paths"])


def test_upstream_records_parse(tmp_path, tok):
    for r in UPSTREAM_RECORDS:
        picture(tmp_path / r["image"], size=(300, 200))
    ds = VLMDataset(write_jsonl(tmp_path / "upstream.jsonl", UPSTREAM_RECORDS), tmp_path, tok, max_length=640)
    assert len(ds) == 2
    for i, r in enumerate(UPSTREAM_RECORDS):
        item = ds[i]
        check_item(item, tok, r["conversations"], 196)
        assert item["pixel_values"].shape == (1, 3, 224, 224)
        assert torch.equal(item["pixel_values"][0], preprocess(Image.open(tmp_path / r["image"]), 224))
        assert item["image_paths"] == [str(tmp_path / r["image"])]
        # the image run sits after the question, as written
        text = tok.decode(item["input_ids"].tolist())
        assert text == tok.apply_chat_template(r["conversations"]).replace("<image>", IMAGE_PAD * 196)


def test_synthetic_splits_labels(shapes, tok):
    for name in ("sft_train", "pretrain_test"):
        ds = VLMDataset(shapes / f"{name}.jsonl", shapes / "images", tok, max_length=256, num_patches=9,
                        image_size=48)
        recs = [json.loads(line) for line in open(shapes / f"{name}.jsonl", encoding="utf-8")]
        assert len(ds) == len(recs)
        for item, r in zip(ds, recs):
            check_item(item, tok, r["conversations"], 9)
            assert item["pixel_values"].shape == (1, 3, 48, 48)


def test_multi_turn_multi_image_and_modes(tmp_path, tok):
    names = [picture(tmp_path / f"{m}.png", mode=m, seed=k).name for k, m in enumerate(["RGBA", "L", "P"])]
    rec = {"conversations": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "<image>What colour is the circle?<image>"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And here?\n<image>"},
        {"role": "assistant", "content": "蓝色 circle"}], "image": " , ".join(names)}
    ds = VLMDataset(write_jsonl(tmp_path / "m.jsonl", [rec]), tmp_path, tok, max_length=200, num_patches=7,
                    image_size=32)
    item = ds[0]
    check_item(item, tok, rec["conversations"], 7)
    for k, n in enumerate(names):   # n-th run <-> n-th picture, each converted from its own mode
        assert torch.equal(item["pixel_values"][k], preprocess(Image.open(tmp_path / n), 32))
    # a list of names works too
    rec["image"] = names
    assert torch.equal(VLMDataset(write_jsonl(tmp_path / "l.jsonl", [rec]), tmp_path, tok, 200, 7, 32)[0]["input_ids"],
                       item["input_ids"])


def test_truncation_never_splits_an_image(tmp_path, tok):
    names = [picture(tmp_path / f"{k}.png", seed=k).name for k in range(3)]
    rec = {"conversations": [{"role": "user", "content": "a<image>b<image><image>c"},
                             {"role": "assistant", "content": "two circles"}], "image": ",".join(names)}
    full = VLMDataset(write_jsonl(tmp_path / "t.jsonl", [rec]), tmp_path, tok, 10_000, 5, 16)[0]
    T = len(full["input_ids"])
    first_reply = int((full["labels"] != IGNORE).nonzero()[0])
    for max_length in range(1, T + 3):
        kept = truncate(full["input_ids"].tolist(), [False] * T, max_length, tok.image_pad_id, 5)[0]
        if len(kept) <= first_reply:         # nothing left to learn: the record is skipped, and said so
            with pytest.raises(ValueError, match=rf"no usable records.*1 reply cut away by max_length.*"
                                                 rf"t\.jsonl:1: the first reply token is at position {first_reply}, "
                                                 rf"past max_length={max_length}"):
                VLMDataset(tmp_path / "t.jsonl", tmp_path, tok, max_length, 5, 16)
            continue
        item = VLMDataset(tmp_path / "t.jsonl", tmp_path, tok, max_length, 5, 16)[0]
        ids = item["input_ids"].tolist()
        assert len(ids) <= max_length
        assert ids == full["input_ids"].tolist()[:len(ids)]                  # a prefix
        assert len(ids) >= max_length - 4                                   # backed up by less than a run
        n = item["pixel_values"].shape[0]
        assert ids.count(tok.image_pad_id) == 5 * n                          # only whole images
        assert torch.equal(item["pixel_values"], full["pixel_values"][:n])
        assert item["image_paths"] == full["image_paths"][:n]
        assert torch.equal(item["labels"], full["labels"][:len(ids)])
    # the helper on its own: a cut inside a run of 2 images backs up to the end of the first
    ids = [7, 3, 3, 3, 3, 8]
    assert truncate(ids, [False] * 6, 4, image_pad_id=3, num_patches=2) == ([7, 3, 3], [False] * 3, 1)


def test_truncation_ignores_a_stray_pad_id_in_the_text():
    """MiniMind2-V's placeholder is the ordinary '@' token, so a text '@' is the pad id too. It is
    not part of an image: the cut still backs up to the image's start, and it is not counted."""
    P = 3                                    # images of 4 placeholders, a lone '@' in the text first
    ids = [7, P, 8, P, P, P, P, 9, P, P, P, P, 10]
    for max_length, keep, images in ((5, 3, 0), (9, 8, 1), (12, 12, 2), (2, 2, 0)):
        assert truncate(ids, [False] * 13, max_length, P, 4) == (ids[:keep], [False] * keep, images), max_length
    assert truncate([P, 5, P, P], [False] * 4, 10, P, 2)[2] == 1                 # not cut: one run of two
    assert truncate([P, P, P, 5], [False] * 4, 10, P, 2)[2] == 1                 # greedy: a run, then a stray


def test_image_run_starts_are_the_splices_runs():
    """The per-record scan finds the runs `splice.runs_of_one_id` (the splice's closed form) finds."""
    from minimind_v.data import image_run_starts
    from minimind_v.splice import runs_of_one_id
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        L = int(torch.randint(1, 6, (1,), generator=g))
        T = int(torch.randint(1, 40, (1,), generator=g))
        ids = torch.randint(0, 3, (1, T), generator=g)          # id 0 is the pad: long blocks and strays
        want = runs_of_one_id(ids, 0, L)[0].nonzero()[:, 0].tolist() if T >= L else []
        assert image_run_starts(ids[0].tolist(), 0, L) == want, (ids[0].tolist(), L)


def test_a_picture_is_decoded_once_per_process_until_it_changes(tmp_path, tok, monkeypatch):
    from minimind_v import data
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    write_jsonl(tmp_path / "d.jsonl", [user_assistant(image="a.png")] * 3)
    decoded = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda p, *a, **k: decoded.append(p) or real(p, *a, **k))
    VLMDataset(tmp_path / "d.jsonl", tmp_path, tok, 256, num_patches=4, image_size=16)
    VLMDataset(tmp_path / "d.jsonl", tmp_path, tok, 256, num_patches=4, image_size=16)
    assert decoded == [tmp_path / "a.png"]                       # three records, two datasets: one decode
    whole = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(whole[:len(whole) // 2])    # the file changes: checked again, and fails
    with pytest.raises(BadRecord, match="a.png"):
        VLMDataset(tmp_path / "d.jsonl", tmp_path, tok, 256, num_patches=4, image_size=16)


def test_collate(shapes, tok):
    ds = VLMDataset(shapes / "sft_test.jsonl", shapes / "images", tok, 256, num_patches=9, image_size=48)
    text_only = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([IGNORE, 6]),
                 "pixel_values": torch.zeros(0, 3, 48, 48), "image_paths": []}
    items = [ds[0], ds[1], text_only]
    b = collate(items)
    T = max(len(x["input_ids"]) for x in items)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, T)
    assert b["pixel_values"].shape == (3, 1, 3, 48, 48)
    assert b["image_counts"].tolist() == [1, 1, 0]
    assert b["image_paths"] == [ds[0]["image_paths"], ds[1]["image_paths"], []]
    for k, x in enumerate(items):
        t = len(x["input_ids"])
        assert torch.equal(b["input_ids"][k, :t], x["input_ids"]) and (b["input_ids"][k, t:] == tok.pad_id).all()
        assert torch.equal(b["labels"][k, :t], x["labels"]) and (b["labels"][k, t:] == IGNORE).all()
        assert b["attention_mask"][k].sum() == t
    assert torch.equal(b["pixel_values"][0, 0], ds[0]["pixel_values"][0])
    assert (b["pixel_values"][2] == 0).all()


def user_assistant(q="What colour?<image>", a="red", image="ok.png"):
    rec = {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if image is not None:
        rec["image"] = image
    return rec


BAD = {   # case -> (record or raw line, reason counted when skipped, what the error says)
    "malformed JSON": ('{"conversations": [', "malformed JSON", "malformed JSON"),
    "not an object": ("[1, 2]", "malformed JSON", "expected a JSON object"),
    "no conversations": ({"image": "ok.png"}, "missing key", "missing key 'conversations'"),
    "no content": ({"conversations": [{"role": "user"}], "image": "ok.png"}, "missing key", "turn 0: missing key 'content'"),
    "no role": ({"conversations": [{"content": "hi"}]}, "missing key", "turn 0: missing key 'role'"),
    "no image key": (user_assistant(image=None), "missing key", "missing key 'image'"),
    "image missing": (user_assistant(image="nope.png"), "image missing", "nope.png: not found; expected"),
    "image corrupt": (user_assistant(image="corrupt.png"), "image unreadable", "corrupt.png: cannot be read as a picture"),
    "image truncated": (user_assistant(image="truncated.png"), "image unreadable", "truncated.png: cannot be decoded"),
    "more <image>": (user_assistant(q="<image>and<image>"), "image count mismatch", "2 <image> placeholder(s) but 1 image"),
    "fewer <image>": (user_assistant(q="no picture"), "image count mismatch", "0 <image> placeholder(s) but 1 image"),
    "empty turns": ({"conversations": [], "image": "ok.png"}, "bad turns", "non-empty list"),
    "empty content": (user_assistant(a=" "), "bad turns", "turn 1: empty content"),
    "assistant first": ({"conversations": [{"role": "assistant", "content": "red"},
                                           {"role": "user", "content": "q<image>"}], "image": "ok.png"},
                        "bad turns", "turn 0: expected role 'user', got 'assistant'"),
    "two users": ({"conversations": [{"role": "user", "content": "q<image>"}, {"role": "user", "content": "q"}],
                   "image": "ok.png"}, "bad turns", "turn 1: expected role 'assistant', got 'user'"),
    "ends with user": ({"conversations": [{"role": "user", "content": "q<image>"}, {"role": "assistant", "content": "a"},
                                          {"role": "user", "content": "q"}], "image": "ok.png"},
                       "bad turns", "last turn is 'user'"),
    "special token": (user_assistant(a="red<|im_end|>"), "bad turns", "special token '<|im_end|>'"),
    "image not a name": (user_assistant(image=5), "bad images", "'image' must be a comma-separated string"),
}


@pytest.fixture
def bad_folder(tmp_path):
    picture(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    whole = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 2])
    return tmp_path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_names_file_and_line(bad_folder, tok, case):
    record, _, message = BAD[case]
    path = write_jsonl(bad_folder / "bad.jsonl", [user_assistant(), "", record])   # the bad record is line 3
    with pytest.raises(BadRecord) as err:
        VLMDataset(path, bad_folder, tok, max_length=64, num_patches=4, image_size=16)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_skip_bad_counts_every_case(bad_folder, tok):
    good = [user_assistant(a=f"answer {k}") for k in range(3)]
    lines = good[:1] + [BAD[c][0] for c in BAD] + good[1:]
    path = write_jsonl(bad_folder / "mixed.jsonl", lines)
    with pytest.warns(UserWarning, match=f"kept 3 of {3 + len(BAD)} records"):
        ds = VLMDataset(path, bad_folder, tok, max_length=64, num_patches=4, image_size=16, skip_bad=True)
    assert len(ds) == 3
    assert [ds[k]["labels"][ds[k]["labels"] != IGNORE].tolist() for k in range(3)] == \
        [tok.encode(f"answer {k}") + [tok.eos_id] for k in range(3)]
    want = {}
    for _, reason, _ in BAD.values():
        want[reason] = want.get(reason, 0) + 1
    assert dict(ds.skipped) == want
    assert len(ds.bad_lines) == len(BAD) and ds.bad_lines[0].startswith(f"{path}:2: ")
    for reason, n in want.items():
        assert f"{n} {reason}" in ds.summary()


def test_nothing_usable_and_missing_file(bad_folder, tok):
    path = write_jsonl(bad_folder / "all_bad.jsonl", ["{oops", "[]"])
    with pytest.raises(ValueError, match="no usable records.*skipped 2 malformed JSON"):
        VLMDataset(path, bad_folder, tok, 64, 4, 16, skip_bad=True)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        VLMDataset(bad_folder / "missing.jsonl", bad_folder, tok, 64, 4, 16)


def test_load_pixels_off(shapes, tok):
    ds = VLMDataset(shapes / "sft_test.jsonl", shapes / "images", tok, 256, num_patches=9, image_size=48)
    with_pixels = collate([ds[0], ds[1]])
    ds.load_pixels = False
    assert "pixel_values" not in ds[0]
    without = collate([ds[0], ds[1]])
    assert without["pixel_values"] is None
    for key in ("input_ids", "labels", "attention_mask", "image_counts"):
        assert torch.equal(without[key], with_pixels[key])
    assert without["image_paths"] == with_pixels["image_paths"]


def test_keep_encoded_gives_the_same_items_and_encodes_once(shapes, tok, monkeypatch):
    import minimind_v.data as D
    plain = VLMDataset(shapes / "sft_train.jsonl", shapes / "images", tok, 256, num_patches=9, image_size=48,
                       load_pixels=False)
    kept = VLMDataset(shapes / "sft_train.jsonl", shapes / "images", tok, 256, num_patches=9, image_size=48,
                      load_pixels=False, keep_encoded=True)
    calls = []
    real = D.encode_sample
    monkeypatch.setattr(D, "encode_sample", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):                                   # two epochs
        for i in range(len(kept)):
            a, b = plain[i], kept[i]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert a["image_paths"] == b["image_paths"]
    assert len(calls) == 2 * len(plain)                  # plain encodes every time, kept only at load time


def test_bytes_that_are_not_utf8_name_file_and_line(bad_folder, tok):
    good = json.dumps(user_assistant(), ensure_ascii=False).encode()
    latin1 = json.dumps(user_assistant(a="café"), ensure_ascii=False).encode("utf-8").replace("é".encode(), b"\xe9")
    path = bad_folder / "latin1.jsonl"
    path.write_bytes(good + b"\n" + latin1 + b"\n" + good + b"\n")
    with pytest.raises(BadRecord, match=rf"^{re.escape(str(path))}:2: bytes b'\\xe9' at byte \d+ of the line "
                                        r"are not UTF-8 .*; expected UTF-8 text"):
        VLMDataset(path, bad_folder, tok, max_length=64, num_patches=4, image_size=16)
    with pytest.warns(UserWarning, match=r"kept 2 of 3 records; skipped 1 not UTF-8; the first 1: .*latin1\.jsonl:2: "):
        ds = VLMDataset(path, bad_folder, tok, max_length=64, num_patches=4, image_size=16, skip_bad=True)
    assert [s.lineno for s in ds.samples] == [1, 3] and dict(ds.skipped) == {"not UTF-8": 1}


def test_summary_shows_the_first_skipped_lines_with_reasons(bad_folder, tok):
    lines = [user_assistant()] + ["{bad"] * 7
    path = write_jsonl(bad_folder / "many.jsonl", lines)
    with pytest.warns(UserWarning) as record:
        ds = VLMDataset(path, bad_folder, tok, 64, 4, 16, skip_bad=True)
    text = str(record[0].message)
    assert text == ds.summary()
    for lineno in range(2, 2 + SHOWN_SKIPS):
        assert f"{path}:{lineno}: malformed JSON" in text
    assert f"{path}:{2 + SHOWN_SKIPS}:" not in text and len(ds.bad_lines) == 7     # all kept, a few shown


def test_records_whose_reply_is_cut_away_are_reported_and_skipped(bad_folder, tok):
    long_question = "What colour is the circle in this picture? " * 20 + "<image>"
    lines = [user_assistant(a="red"), user_assistant(q=long_question, a="blue"), user_assistant(a="green")]
    path = write_jsonl(bad_folder / "long.jsonl", lines)
    with pytest.warns(UserWarning, match=r"kept 2 of 3 records; skipped 1 reply cut away by max_length; "
                                         r"the first 1: .*long\.jsonl:2: the first reply token is at position \d+, "
                                         r"past max_length=64"):
        ds = VLMDataset(path, bad_folder, tok, max_length=64, num_patches=4, image_size=16)   # even without skip_bad
    assert [s.lineno for s in ds.samples] == [1, 3]
    batch = collate([ds[0], ds[1]])
    assert ((batch["labels"] != IGNORE).sum(1) > 0).all()          # every row has something to learn


def test_samples_keep_the_record_and_its_extra_keys(shapes, tok):
    ds = VLMDataset(shapes / "sft_test.jsonl", shapes / "images", tok, 256, num_patches=9, image_size=48)
    recs = [json.loads(line) for line in open(shapes / "sft_test.jsonl", encoding="utf-8")]
    assert len(ds.samples) == len(recs)
    for k, (sample, rec) in enumerate(zip(ds.samples, recs)):
        assert isinstance(sample, Sample) and sample.lineno == k + 1
        assert sample.messages == rec["conversations"]
        assert sample.images == [shapes / "images" / rec["image"]]
        assert sample.extra == {key: v for key, v in rec.items() if key not in ("conversations", "image")}
        assert {"qtype", "lang"} <= set(sample.extra)


def test_text_only_and_mixed_batches_train():
    """collate's (B, 0, 3, S, S) for a text-only batch goes through the VLM as the LM alone would;
    a batch mixing rows with and without a picture gives a finite loss and gradients."""
    import torch.nn.functional as F
    from test_vlm import PAD, P, tiny_model

    model = tiny_model()
    S = model.cfg.vision.image_size

    def item(ids, labels, n_images, seed=0):
        pixels = torch.randn(n_images, 3, S, S, generator=torch.Generator().manual_seed(seed))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
                "image_paths": [f"{seed}.png"] * n_images}

    def loss(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    text = [item([1, 2, 3, 4, 6], [IGNORE, IGNORE, 3, 4, 6], 0), item([7, 8, 9], [IGNORE, 8, 9], 0)]
    batch = collate(text)
    assert batch["pixel_values"].shape == (2, 0, 3, S, S)
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(logits, model.lm(batch["input_ids"], attention_mask=batch["attention_mask"]),
                               rtol=0, atol=0)
    assert torch.isfinite(loss(logits, batch["labels"]))

    with_image = item([1] + [PAD] * P + [2, 3], [IGNORE] * (1 + P) + [2, 3], 1, seed=1)
    batch = collate([text[0], with_image, text[1]])
    assert batch["pixel_values"].shape == (3, 1, 3, S, S)
    model.train()
    value = loss(model(batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"]), batch["labels"])
    value.backward()
    assert torch.isfinite(value)
    proj = model.vision_proj.vision_proj[0].weight.grad
    assert proj is not None and proj.abs().sum() > 0                    # the picture's row reaches the projector
    assert model.lm.embed_tokens.weight.grad.abs().sum() > 0
