"""Grades lessons/01-tokenizer/exercise.py (or minimind_v with --reference)."""
from __future__ import annotations

import json
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


# ---------------------------------------------------------------------- byte-level BPE
# The trusted reference is `tokenizers` (the Rust library that wrote upstream's tokenizer.json).
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

TEXTS = ["I'm 7 ok!!\n", "it's  x\n\n y", "红色的圆，在左上。", "She'll've DON'T 'S x's", "a\u00a0b\u3000c\x1cd",
         "e\u0301 ½ ⅷ ١٢٣ 😀👩‍👩‍👧", "  \t\n  \n", "$12.50, 3x4=12 #tag @you", "\u2028x\u0085y  ", "'''' 're've",
         "x\x1c\x1cy \x1f z", "x½_y ⅷ2 a_b"]


@pytest.fixture(scope="module")
def hf_bpe():
    """A small byte-level BPE trained with `tokenizers`: (tokenizer, ranks {(a, b): rank})."""
    rng = random.Random(2)
    en = "the red green circle square left right top it's we'll".split()
    lines = [" ".join(rng.choices(en, k=6)) + " " + "".join(rng.choices("红色绿圆形在左上的是", k=6)) + "。"
             for _ in range(400)]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tok, {tuple(m): r for r, m in enumerate(merges)}


def test_byte_table(ex):
    table = ex.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert [table[b] for b in (0, 10, 32, 65, 126, 127, 160, 161, 172, 173, 174, 255)] == \
        ["Ā", "Ċ", "Ġ", "A", "~", "ġ", "ł", "¡", "¬", "Ń", "®", "ÿ"]
    # every byte of every character, as the ByteLevel pre-tokenizer of `tokenizers` writes it
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in ["hello world\n\t\x00\x7f", "红色😀", "\u00a0\u00ad\u0080\u009f", "".join(map(chr, range(1, 128)))]:
        assert "".join(table[b] for b in text.encode()) == pre.pre_tokenize_str(text)[0][0]


@pytest.mark.parametrize("text", TEXTS)
def test_split_words(ex, text):
    """The words equal the ByteLevel pre-tokenizer's (which writes them in the byte table's spelling)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode as gpt2_table
    want = [w for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]
    got = ex.split_words(text)
    assert "".join(got) == text
    assert ["".join(gpt2_table()[b] for b in w.encode()) for w in got] == want


def test_split_contractions(ex):
    assert ex.split_words("it's we'll I'M") == ["it", "'s", " we", "'ll", " I", "'", "M"]
    assert ex.split_words("x 's") == ["x", " '", "s"]     # a space before the apostrophe: punctuation


def test_bpe_merge_by_rank(ex):
    ranks = {("b", "c"): 0, ("a", "b"): 1}
    assert ex.bpe_merge(list("abc"), ranks) == ["a", "bc"]            # rank 0 first, although a+b is further left
    assert ex.bpe_merge(list("ababc"), ranks) == ["ab", "a", "bc"]    # not the most frequent pair (a+b, twice) first
    assert ex.bpe_merge(list("aaa"), {("a", "a"): 0}) == ["aa", "a"]  # overlapping: left to right
    assert ex.bpe_merge(list("aaaa"), {("a", "a"): 0, ("aa", "aa"): 1}) == ["aaaa"]
    assert ex.bpe_merge(["x"], ranks) == ["x"] and ex.bpe_merge(list("cb"), ranks) == ["c", "b"]


def test_word_pieces_equal_tokenizers(ex, hf_bpe):
    tok, ranks = hf_bpe
    rng = random.Random(3)
    words = [" red", " circle", "it", "'s", "红色的圆形", " lefty", "squares", "😀", " 左上", "ｇ"]
    words += ["".join(rng.choices("the redcirlg红色圆形在左上", k=rng.randint(1, 9))) for _ in range(100)]
    for w in words:
        assert ex.word_pieces(w, ranks) == tok.encode(w, add_special_tokens=False).tokens, w


def test_byte_decode(ex, hf_bpe):
    tok, _ = hf_bpe
    rng = random.Random(4)
    pieces = list(tok.get_vocab())
    assert ex.byte_decode(["ç", "º¢", "è", "ī²"]) == "红色"          # characters cut across pieces
    assert ex.byte_decode(["Ġred", "ç"]) == " red\ufffd"              # a cut character at the end
    assert ex.byte_decode(["<a b>", "Ġx"]) == "<a b> x"               # outside the table: its own bytes
    for _ in range(200):
        tokens = rng.choices(pieces, k=rng.randint(0, 12))
        assert ex.byte_decode(tokens) == decoders.ByteLevel().decode(tokens)
