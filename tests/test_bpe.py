"""Byte-level BPE (minimind_v.bpe) against `tokenizers` on the same tokenizer.json files.

Two kinds of files: upstream MiniMind-V's two real ones (../shared/upstream, skipped when absent)
and small ones trained here with `tokenizers` in the same structure (always run). For each, the
ids of `encode` and the text of `decode` must equal what `tokenizers.Tokenizer` gives.
"""
from __future__ import annotations

import json
import random
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers  # noqa: E402

from minimind_v.bpe import (ByteLevelBPE, bpe_merge, bpe_merge_ids, byte_decode, bytes_to_unicode,  # noqa: E402
                            pair_key, split_words)

UPSTREAM = Path(__file__).resolve().parents[1].parent / "shared" / "upstream"
UPSTREAM_FILES = [UPSTREAM / g / "tokenizer.json" for g in ("minimind2-v", "minimind-3v")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"
EN = ["the", "red", "circle", "is", "at", "top", "left", "picture", "I'm", "it's", "we've", "HELLO", "Don't"]


def train_file(tmp: Path, seed: int, merges_as_strings: bool = False, use_regex: bool = True) -> Path:
    """A byte-level BPE trained with `tokenizers` like upstream's: same pre-tokenizer, decoder, specials."""
    rng = random.Random(seed)
    lines = []
    for _ in range(1500):
        zh = "".join(rng.choices(ZH, k=rng.randint(2, 12)))
        en = " ".join(rng.choices(EN, k=rng.randint(1, 6)))
        lines.append(rng.choice([f"{zh}，{en}。", f"{en} {rng.randint(0, 99999)} {zh}！😀\n\n", f"  {en}\t{zh}e\u0301"]))
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=900, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>", "<x>", "<x><y>")])
    tok.add_special_tokens([AddedToken("<|image_pad|>", normalized=False, special=True)])
    path = tmp / f"trained{seed}{'s' if merges_as_strings else ''}{'' if use_regex else 'n'}.json"
    tok.save(str(path))
    if merges_as_strings:          # the older "a b" spelling of the merges (same meaning)
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["model"]["merges"] = [f"{a} {b}" for a, b in spec["model"]["merges"]]
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    # the third splits nothing (use_regex false): BPE then runs on all the text between added tokens
    return [train_file(tmp, 0), train_file(tmp, 1, merges_as_strings=True), train_file(tmp, 2, use_regex=False)]


def all_files(trained):
    return trained + [f for f in UPSTREAM_FILES if f.is_file()]


@pytest.fixture(scope="module")
def pairs(trained):
    """(ours, theirs) for every file: the trained ones and upstream's when present."""
    return [(ByteLevelBPE.from_file(f), tokenizers.Tokenizer.from_file(str(f))) for f in all_files(trained)]


def check_same(pairs, text):
    for ours, theirs in pairs:
        want = theirs.encode(text, add_special_tokens=False).ids
        got = ours.encode(text)
        assert got == want, f"{ours.source}: {text!r}"
        assert ours.decode(got) == theirs.decode(want, skip_special_tokens=False)


# ---------------------------------------------------------------------- 1. the byte table
def test_byte_table_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_table
    ours = bytes_to_unicode()
    assert ours == hf_table()                      # byte -> character, all 256 in the same order
    assert set(ours.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (ours[32], ours[10], ours[127], ours[160], ours[173], ours[161]) == ("Ġ", "Ċ", "ġ", "ł", "Ń", "¡")


# ---------------------------------------------------------------------- 2. the split regex
def test_split_regex_on_every_assigned_code_point():
    """Every character Python's Unicode database assigns, in several contexts, splits as `tokenizers` does.

    (Characters that a newer Unicode version assigned after Python's database, category Cn here,
    are the one known difference: the regex engine of `tokenizers` may know them as letters.)
    """
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    table = bytes_to_unicode()
    chars = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    for context in ("a{}", "1{}", " {}", "{}a", "'{}", "{}{} x", "!{}", "\n{}\n", "{}  "):
        for k in range(0, len(chars), 20000):
            text = "|".join(context.format(c, c) for c in chars[k:k + 20000])
            want = [w for w, _ in pre.pre_tokenize_str(text)]
            got = ["".join(table[b] for b in w.encode()) for w in split_words(text)]
            assert got == want, f"context {context!r}, characters {k}..{k + 20000}"


def test_split_examples():
    assert split_words("I'm 7 ok!!\n") == ["I", "'m", " 7", " ok", "!!", "\n"]
    assert split_words("it's  x\n\n y") == ["it", "'s", " ", " x", "\n\n", " y"]
    assert split_words("红色的圆，在左上。") == ["红色的圆", "，", "在左上", "。"]


# ---------------------------------------------------------------------- 3. merges by rank
def test_heap_merge_equals_the_plain_loop(pairs):
    rng = random.Random(0)
    table = bytes_to_unicode()
    for ours, _ in pairs:
        for _ in range(300):
            word = "".join(rng.choices(ZH + "abcdefghij ", k=rng.randint(1, 30)))
            symbols = [table[b] for b in word.encode()]
            want = [ours.vocab[s] for s in bpe_merge(symbols, ours.ranks)]
            assert bpe_merge_ids([ours.vocab[s] for s in symbols], ours.merges) == want


def merge_both(word: str, merges: list[tuple[str, str]]):
    """The plain loop and the heap on the same toy merge list (ids: positions in a toy vocab)."""
    ranks = {pair: r for r, pair in enumerate(merges)}
    vocab = {s: i for i, s in enumerate(dict.fromkeys([*word, *(a for a, _ in merges), *(b for _, b in merges),
                                                       *(a + b for a, b in merges)]))}
    ids = bpe_merge_ids([vocab[c] for c in word], {pair_key(vocab[a], vocab[b]): (r, vocab[a + b])
                                                   for (a, b), r in ranks.items()})
    inverse = {i: s for s, i in vocab.items()}
    return bpe_merge(list(word), ranks), [inverse[i] for i in ids]


def test_merge_by_rank_not_by_position():
    # b+c has the lowest rank, so it goes first although a+b stands further left
    assert merge_both("abc", [("b", "c"), ("a", "b"), ("a", "bc")]) == (["abc"], ["abc"])
    assert merge_both("abc", [("a", "b"), ("b", "c"), ("ab", "c")]) == (["abc"], ["abc"])
    assert merge_both("abcd", [("c", "d"), ("a", "b"), ("b", "c")]) == (["ab", "cd"], ["ab", "cd"])
    # overlapping occurrences: left to right
    assert merge_both("aaa", [("a", "a")]) == (["aa", "a"], ["aa", "a"])
    assert merge_both("aaaaa", [("a", "a"), ("aa", "aa")]) == (["aaaa", "a"], ["aaaa", "a"])


# ---------------------------------------------------------------------- 4. the whole file
FIXED = ["", " ", "   ", "\n", "\n\n\n", " \n \n", "hello world", "Hello, World! It's 2024.", "I'm  you'll we'd",
         "红色的圆形在左上。", "生僻字：龘靐齉爩", "emoji 😀🎉👩‍👩‍👧 ok", "e\u0301 vs \u00e9", "ｆｕｌｌ ｗｉｄｔｈ",
         "<|im_start|>user\nhi<|im_end|>\n", "<|im_end|<|im_end|>>", "<think>\n\n</think>\n\n", "a<|image_pad|>b",
         "12345678901234567890", "<x><y>z<x><x><y", "<x<x>>", "\x00\x7f\u200b\u00ad\u0085\u00a0", "\t\t  \r\n", "'s's'S 'll", "@" * 196, "。@@@@ @"]


@pytest.mark.parametrize("text", FIXED)
def test_fixed_texts(pairs, text):
    check_same(pairs, text)


FRAGMENTS = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cn")), max_size=12),   # any assigned character
    st.text(alphabet=ZH + "，。！？、", min_size=1, max_size=12),                       # Chinese
    st.sampled_from(EN + [" " + w for w in EN]),                                      # English
    st.text(alphabet=" \n\t\r", min_size=1, max_size=6),                                # runs of spaces
    st.text(alphabet="0123456789", min_size=1, max_size=8),
    st.sampled_from(["😀", "🎉", "👩‍👩‍👧", "e\u0301", "\u0308", "\u200d", "'s", "'re", "@"]),
    st.sampled_from(SPECIALS + ["<think>", "</think>", "<|image_pad|>", "<|im_end", "im_end|>", "<x>", "<y>"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(FRAGMENTS, max_size=12).map("".join))
def test_random_unicode(pairs, text):
    check_same(pairs, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_decode_random_ids(pairs, data):
    """Any id sequence, including ones that cut a character's bytes apart (-> U+FFFD), decodes alike."""
    for ours, theirs in pairs:
        ids = data.draw(st.lists(st.integers(0, len(ours) - 1), max_size=40))
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)


def test_sizes_and_added_tokens(pairs):
    for ours, theirs in pairs:
        assert len(ours) == theirs.get_vocab_size(with_added_tokens=True)
        for s in SPECIALS:
            assert ours.encode(s) == [theirs.token_to_id(s)]
        assert ours.special >= set(SPECIALS)


def test_cache_gives_the_same_ids(trained):
    tok = ByteLevelBPE.from_file(trained[0])
    tok.CACHE_SIZE = 3                 # force the cache to be emptied again and again
    text = "红色的圆 the red circle 红色的圆 it's 123 " * 5
    assert tok.encode(text) == ByteLevelBPE.from_file(trained[0]).encode(text)
    assert len(tok._cache) <= 3


def test_byte_decode_added_token_with_space():
    assert byte_decode(["<a b>", "Ġx"]) == "<a b> x"
    assert byte_decode([bytes_to_unicode()[0xE4]]) == "\ufffd"


# ---------------------------------------------------------------------- bad files
def edit(trained, tmp_path, change):
    spec = json.loads(trained[0].read_text(encoding="utf-8"))
    change(spec)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer must be null"),
    (lambda s: s["model"].update(type="Unigram"), "model.type must be 'BPE'"),
    (lambda s: s["pre_tokenizer"].update(type="Whitespace"), "pre_tokenizer.type must be 'ByteLevel'"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space must be false"),
    (lambda s: s.update(decoder=None), "decoder.type must be 'ByteLevel'"),
    (lambda s: s["model"]["merges"].__setitem__(0, "a b c"), r"model.merges\[0\] must be"),
    (lambda s: s["model"]["merges"].__setitem__(0, ["\u4e00\u4e00", "y"]), "needs '\u4e00\u4e00', which is not in the vocab"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), r"added_tokens\[0\].lstrip must be false"),
    (lambda s: s["model"]["vocab"].pop("Ġ"), "lacks 1 of the 256 byte characters"),
])
def test_bad_file_is_a_clear_error(trained, tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as e:
        ByteLevelBPE.from_file(edit(trained, tmp_path, change))
    assert "edited.json" in str(e.value)


def test_missing_or_junk_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ByteLevelBPE.from_file(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json is not a JSON tokenizer file"):
        ByteLevelBPE.from_file(tmp_path / "junk.json")


def test_decode_unknown_id_names_the_file(trained):
    tok = ByteLevelBPE.from_file(trained[0])
    with pytest.raises(ValueError, match=r"trained0.json: id 99999 is not in the vocabulary"):
        tok.decode([5, 99999])
