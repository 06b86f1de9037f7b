"""Tokenizer: exact round trips, single-id special tokens, the chat template, the image run."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind_v.tokenizer import (BOS, EOS, IMAGE_PAD, IMAGE_TOKEN, PAD, SPECIAL_TOKENS, Tokenizer,
                                  chat_template, cli, load_tokenizer)

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


# ---------------------------------------------------------------------- load_tokenizer
UPSTREAM = Path(__file__).resolve().parents[1].parent / "shared" / "upstream"
needs_upstream = pytest.mark.skipif(not UPSTREAM.is_dir(), reason="upstream files not present")
UPSTREAM_IMAGE = {"minimind2-v": ("@", 34, 196), "minimind-3v": ("<|image_pad|>", 12, 64)}


def upstream_labels(ids: list[int], reply_start: list[int], reply_end: list[int]) -> list[bool]:
    """Upstream MiniMind-V's loss mask, written out plainly: for each `<|im_start|>assistant\\n`,
    every id after it up to the next `<|im_end|>\\n`, that marker included (to the end if none)."""
    labels = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + len(reply_start)] == reply_start:
            start = i + len(reply_start)
            end = start
            while end < len(ids):
                if ids[end:end + len(reply_end)] == reply_end:
                    break
                end += 1
            for j in range(start, min(end + len(reply_end), len(ids))):
                labels[j] = True
            i = end + len(reply_end) if end < len(ids) else len(ids)
        else:
            i += 1
    return labels


def test_load_tokenizer_sentencepiece(tok, tmp_path):
    same = load_tokenizer(tok.model_file)
    assert isinstance(same, Tokenizer) and same.label_newline is False and same.template == "chatml"
    shutil.copyfile(tok.model_file, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).encode("the red circle") == tok.encode("the red circle")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "红色"}]
    ids, target = tok.encode_conversation(msgs)
    ids_nl, target_nl = load_tokenizer(tok.model_file, label_newline=True).encode_conversation(msgs)
    assert ids_nl == ids
    assert tok.decode([i for i, t in zip(ids, target) if t]) == f"红色{EOS}"
    assert tok.decode([i for i, t in zip(ids_nl, target_nl) if t]) == f"红色{EOS}\n"


@pytest.fixture(scope="module")
def trained_json(tmp_path_factory):
    """A byte-level BPE folder trained with `tokenizers` in upstream's layout (specials 0, 1, 2)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tmp = tmp_path_factory.mktemp("bpe_folder")
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS_EN, k=6)) + "？" + "".join(rng.choices(WORDS_ZH, k=3)) for _ in range(500)]
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=[PAD, BOS, EOS],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    t.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "chat_template": "{{ messages }}"}))
    return tmp, t


def test_load_trained_tokenizer_json(trained_json):
    folder, ref = trained_json
    with pytest.raises(ValueError, match=r"tokenizer_config.json: unknown chat_template"):
        load_tokenizer(folder)
    tok = load_tokenizer(folder / "tokenizer.json", template="minimind2-v")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_pad_id, tok.num_patches) == (0, 1, 2, ref.token_to_id("@"), 196)
    assert tok.label_newline is True and len(tok) == tok.vocab_size == ref.get_vocab_size()
    text = f"the red circle？红色{EOS}\n{BOS}x"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text and tok.pieces("the red")[1:] == ["Ġred"]
    msgs = [{"role": "user", "content": "what colour?" + IMAGE_TOKEN}, {"role": "assistant", "content": "红色"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "blue circle"}]
    ids, target = tok.encode_conversation(msgs, num_patches=5)
    assert tok.decode(ids) == tok.apply_chat_template(msgs).replace(IMAGE_TOKEN, "@" * 5)
    assert tok.decode([i for i, t in zip(ids, target) if t]) == f"红色{EOS}\nblue circle{EOS}\n"
    tok.label_newline = False
    ids2, target2 = tok.encode_conversation(msgs, num_patches=5)
    assert ids2 == ids and tok.decode([i for i, t in zip(ids, target2) if t]) == f"红色{EOS}blue circle{EOS}"
    prompt, _ = tok.encode_conversation(msgs[:3], num_patches=5, add_generation_prompt=True)
    assert tok.decode(prompt).endswith(f"and?{EOS}\n{BOS}assistant\n")


def test_load_tokenizer_errors(trained_json, tmp_path):
    folder, _ = trained_json
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json"):
        load_tokenizer(tmp_path)
    shutil.copyfile(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config.json does not exist"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        load_tokenizer(tmp_path, template="chatml")
    with pytest.raises(ValueError, match="unknown chat template 'llama'"):
        load_tokenizer(folder, template="llama")


@needs_upstream
@pytest.mark.parametrize("g", ["minimind2-v", "minimind-3v"])
def test_upstream_tokenizer_interface(g):
    tok = load_tokenizer(UPSTREAM / g)
    image, image_id, n = UPSTREAM_IMAGE[g]
    assert tok.template == g and tok.label_newline is True
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_pad_id, tok.image_token, tok.num_patches) == (0, 1, 2, image_id, image, n)
    assert len(tok) == 6400 and tok.encode(EOS) == [2] and tok.decode([1]) == BOS
    assert load_tokenizer(UPSTREAM / g / "tokenizer.json").encode("红色 circle") == tok.encode("红色 circle")


@needs_upstream
@pytest.mark.parametrize("context", ["{}", "看图：{}", "仔细看一下这张图：\n\n{}\n\n描述一下。", "a{}b", " {} ", "。{}。",
                                     "!!{}!!", "12{}34", "{}{}", "x\n{}", "😀{}😀", "<|im_end|>{}<|im_start|>"])
def test_minimind2v_image_run_is_196_ids_of_34(context):
    """Our run (ids written directly) equals upstream's ('@' x 196 in the text, tokenized), in every context."""
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(str(UPSTREAM / "minimind2-v" / "tokenizer.json"))
    tok = load_tokenizer(UPSTREAM / "minimind2-v")
    content = context.replace("{}", IMAGE_TOKEN)
    ids = tok.encode_content(content)
    assert ids == ref.encode(content.replace(IMAGE_TOKEN, "@" * 196), add_special_tokens=False).ids
    runs = "".join("@" if i == 34 else "." for i in ids).split(".")
    assert sorted(len(r) for r in runs if r) == [196] * content.count(IMAGE_TOKEN) or context == "{}{}"
    assert ids.count(34) == 196 * content.count(IMAGE_TOKEN)


UPSTREAM_CONVERSATIONS = [
    [{"role": "user", "content": "仔细看一下这张图：\n\n<image>\n\n描述一下这个图像的内容。"}, {"role": "assistant", "content": "一只金色的狗。"}],
    [{"role": "system", "content": "你是minimind，请尽力帮助用户解决问题。"}, {"role": "user", "content": "What colour?<image>"},
     {"role": "assistant", "content": "It's red."}, {"role": "user", "content": "and the shape? 123"},
     {"role": "assistant", "content": "a circle 😀\n\n  ok"}],
    [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "<think>\nlook\n</think>\n\nboth"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\n  starts with newlines"}],
]


@needs_upstream
@pytest.mark.parametrize("g", ["minimind2-v", "minimind-3v"])
@pytest.mark.parametrize("k", range(len(UPSTREAM_CONVERSATIONS)))
@pytest.mark.parametrize("label_newline", [True, False])
def test_encode_conversation_equals_upstream(g, k, label_newline):
    """ids = upstream's tokenization of upstream's prompt; targets = upstream's loss mask on those ids."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(UPSTREAM / g))
    tok = load_tokenizer(UPSTREAM / g, label_newline=label_newline)
    image, _, n = UPSTREAM_IMAGE[g]
    msgs = UPSTREAM_CONVERSATIONS[k]
    upstream_msgs = [dict(m, content=m["content"].replace(IMAGE_TOKEN, image * n)) for m in msgs]
    prompt = hf.apply_chat_template(upstream_msgs, tokenize=False, add_generation_prompt=False)
    want_ids = hf(prompt).input_ids
    reply_start = hf(f"{hf.bos_token}assistant\n", add_special_tokens=False).input_ids
    reply_end = hf(f"{hf.eos_token}\n" if label_newline else hf.eos_token, add_special_tokens=False).input_ids
    ids, target = tok.encode_conversation(msgs, n)
    assert ids == want_ids
    assert target == upstream_labels(want_ids, reply_start, reply_end)
    assert any(target)
    gen_prompt = hf.apply_chat_template(upstream_msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.encode_conversation(msgs[:-1], n, add_generation_prompt=True)[0] == hf(gen_prompt).input_ids


@needs_upstream
def test_cli_encode_upstream(capsys):
    assert cli(["encode", "--model", str(UPSTREAM / "minimind-3v"), "<think>红色"]) == 0
    out = capsys.readouterr().out
    n = len(load_tokenizer(UPSTREAM / "minimind-3v").encode("<think>红色"))
    assert out.startswith(f"{n} tokens") and "    25  '<think>'" in out
