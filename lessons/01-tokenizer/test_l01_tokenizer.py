"""Grades lessons/01-tokenizer/exercise.py (or minimind_v with --reference)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from minimind_v.tokenizer import Tokenizer

SENNRICH = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3


def test_bpe_first_merges(ex):
    # e-s and s-t both occur 9 times; e-s is seen first. Then es+t, then l+o, lo+w (7 each)...
    assert ex.bpe_train(SENNRICH, 5) == [("e", "s"), ("es", "t"), ("l", "o"), ("lo", "w"), ("n", "e")]


def test_bpe_each_merge_is_most_frequent(ex):
    rng = random.Random(0)
    words = ["".join(rng.choices("abcde", k=rng.randint(2, 7))) for _ in range(60)]
    merges = ex.bpe_train(words, 25)
    assert len(merges) == 25
    pieces = {w: list(w) for w in words}
    for a, b in merges:              # recount independently before every merge
        counts = Counter()
        for w in words:
            counts.update(zip(pieces[w], pieces[w][1:]))
        assert counts[a, b] == max(counts.values())
        for w in pieces:
            p, out, i = pieces[w], [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[w] = out
    for w in set(words):
        assert ex.bpe_encode(w, merges) == pieces[w]
    # once everything is merged, training stops early
    assert ex.bpe_train(["abab"] * 3, 100) == [("a", "b"), ("ab", "ab")]


def test_bpe_encode_unseen_word(ex):
    merges = ex.bpe_train(SENNRICH, 10)
    assert ex.bpe_encode("lowest", merges) == ["low", "est"]
    assert ex.bpe_encode("xyz", merges) == ["x", "y", "z"]


def test_chat_template(ex):
    msgs = [{"role": "user", "content": "什么颜色？<image>"}, {"role": "assistant", "content": "红色"}]
    assert ex.chat_template(msgs) == "<|im_start|>user\n什么颜色？<image><|im_end|>\n<|im_start|>assistant\n红色<|im_end|>\n"
    assert ex.chat_template(msgs[:1], add_generation_prompt=True) == \
        "<|im_start|>user\n什么颜色？<image><|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("l01")
    rng = random.Random(1)
    words = "the red circle is at top left 红色 圆形 在 左上".split()
    (tmp / "c.txt").write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(300)), encoding="utf-8")
    return Tokenizer.train([tmp / "c.txt"], tmp / "t", vocab_size=320)


@pytest.mark.parametrize("num_patches", [1, 4, 49])
def test_image_runs(ex, tok, num_patches):
    content = "left<image> and 红色<image><image>"
    ids = ex.encode_content(tok, content, num_patches)
    pad = tok.image_pad_id
    assert ids.count(pad) == 3 * num_patches
    first = ids.index(pad)
    assert ids[first:first + num_patches] == [pad] * num_patches and ids[first + num_patches] != pad
    assert tok.decode(ids) == content.replace("<image>", "<|image_pad|>" * num_patches)
    assert ids[:first] == tok.encode("left")
