"""Tokenizer: exact round trips, single-id special tokens, the chat template, the image run."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind_v.tokenizer import (BOS, EOS, IMAGE_PAD, IMAGE_TOKEN, PAD, SPECIAL_TOKENS, Tokenizer,
                                  chat_template, cli)

WORDS_EN = "the red green blue circle square triangle where is what colour shape how many picture".split()
WORDS_ZH = "红色 绿色 蓝色 圆形 正方形 三角形 在哪里 什么 颜色 形状 图片 里 有 几个".split()


def tiny_corpus(tmp_path):
    """A small JSONL conversation file plus a text file: enough for a few hundred merges."""
    rng = random.Random(0)
    jsonl = tmp_path / "conv.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for _ in range(300):
            q = " ".join(rng.choices(WORDS_EN, k=6)) + "?" + IMAGE_TOKEN
            a = "".join(rng.choices(WORDS_ZH, k=4))
            rec = {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                   "image": "x.png"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    text = tmp_path / "plain.txt"
    text.write_text("\n".join(" ".join(rng.choices(WORDS_EN + WORDS_ZH, k=8)) for _ in range(200)),
                    encoding="utf-8")
    return [jsonl, text]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return Tokenizer.train(tiny_corpus(tmp), tmp / "tiny", vocab_size=400, user_defined_symbols=["红色"])


def test_layout_and_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_pad_id) == (0, 1, 2, 3)
    assert 300 < len(tok) <= 400
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.encode(s) == [i]
        assert tok.decode([i]) == s
        # a special token glued to text on both sides is still one id
        ids = tok.encode(f"ab{s}cd")
        assert ids.count(i) == 1 and tok.decode(ids) == f"ab{s}cd"


def test_learned_merges_and_user_symbols(tok):
    # the BPE learned multi-character pieces from the corpus (not just characters/bytes)
    assert len(tok.encode("the red circle")) < len("the red circle")
    assert tok.pieces("红色") == ["红色"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_round_trip_random_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [
    "", " ", "  two  spaces  ", "\n\n\t tab", "红色的圆形在左上。", "生僻字：龘靐齉爩", "emoji 😀🎉👩‍👩‍👧 ok",
    "a▁b ▁▁", "<|im_start|>user\nhi<|im_end|>\n", "<|im_end|<|im_end|>>", "<image>", "\x00\x7f\u200b",
    "mixed 中文 and English 123 4567.89", "e\u0301 vs \u00e9 (no normalisation)", "ｆｕｌｌ ｗｉｄｔｈ",
])
def test_round_trip_fixed(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_never_unknown(tok):
    ids = tok.encode("靐😀")           # characters the tiny corpus never saw
    assert 4 not in ids                # no <unk>
    assert all(tok.sp.is_byte(i) for i in ids) and len(ids) == len("靐😀".encode())


def test_chat_template_text(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi<image>"},
            {"role": "assistant", "content": "ok"}]
    want = (f"{BOS}system\nbe brief{EOS}\n{BOS}user\nhi<image>{EOS}\n{BOS}assistant\nok{EOS}\n")
    assert tok.apply_chat_template(msgs) == want
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=True) == chat_template(msgs[:2]) + f"{BOS}assistant\n"


@pytest.mark.parametrize("num_patches", [1, 9, 196])
def test_image_run_exact_length(tok, num_patches):
    content = "left" + IMAGE_TOKEN + "mid" + IMAGE_TOKEN + IMAGE_TOKEN + "红色"
    ids = tok.encode_content(content, num_patches)
    # runs of image_pad ids: positions and lengths
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == tok.image_pad_id:
            j = i
            while j < len(ids) and ids[j] == tok.image_pad_id:
                j += 1
            runs.append(j - i)
            i = j
        else:
            i += 1
    assert runs == [num_patches, 2 * num_patches]      # two adjacent <image>s form one longer run
    assert ids.count(tok.image_pad_id) == 3 * num_patches
    text = tok.decode(ids)
    assert text == content.replace(IMAGE_TOKEN, IMAGE_PAD * num_patches)


def test_encode_conversation_targets(tok):
    msgs = [{"role": "user", "content": "what colour?" + IMAGE_TOKEN}, {"role": "assistant", "content": "红色"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "blue circle"}]
    ids, target = tok.encode_conversation(msgs, num_patches=5)
    assert len(ids) == len(target)
    # the ids spell the template with each <image> expanded
    assert tok.decode(ids) == chat_template(msgs).replace(IMAGE_TOKEN, IMAGE_PAD * 5)
    # the targets spell the assistant replies with their end markers, nothing else
    assert tok.decode([i for i, t in zip(ids, target) if t]) == f"红色{EOS}blue circle{EOS}"
    ids2, target2 = tok.encode_conversation(msgs[:3], num_patches=5, add_generation_prompt=True)
    assert tok.decode(ids2).endswith(f"and?{EOS}\n{BOS}assistant\n") and not any(target2[-3:])


def test_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model is not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_bad_training_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n{"conversations": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        Tokenizer.train([bad], tmp_path / "t", vocab_size=300)


def test_cli_train_and_encode(tmp_path, capsys):
    files = tiny_corpus(tmp_path)
    assert cli(["train", *map(str, files), "--out", str(tmp_path / "c"), "--vocab-size", "400",
                "--symbols", "circle,圆形"]) == 0
    tok = Tokenizer(tmp_path / "c.model")
    assert tok.pieces("circle") == ["circle"] and tok.pieces("圆形") == ["圆形"]
    assert cli(["encode", "--model", str(tmp_path / "c.model"), f"{PAD}hi"]) == 0
    out = capsys.readouterr().out
    assert "'<|endoftext|>'" in out
    assert cli(["train", *map(str, files), "--out", str(tmp_path / "w"), "--vocab-size", "400", "--answer-words"]) == 0
    assert Tokenizer(tmp_path / "w.model").pieces("top left") == ["top", "▁left"]


def test_vocab_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        Tokenizer.train(tiny_corpus(tmp_path), tmp_path / "t", vocab_size=100)
