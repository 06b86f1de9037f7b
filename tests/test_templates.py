"""Chat templates in plain Python (minimind_v.templates) against `transformers` on upstream's real configs.

The upstream comparisons need ../shared/upstream (skipped when absent); the structure and the
errors are checked always.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind_v.templates import (DEFAULT_SYSTEM, TEMPLATES, detect_template, render, render_chatml,
                                  split_reasoning, template_hash)

UPSTREAM = Path(__file__).resolve().parents[1].parent / "shared" / "upstream"
GENERATIONS = ["minimind2-v", "minimind-3v"]
needs_upstream = pytest.mark.skipif(not UPSTREAM.is_dir(), reason="upstream files not present")

CONVERSATIONS = [
    [{"role": "user", "content": "仔细看一下这张图：\n\n<image>\n\n描述一下这个图像的内容。"}],
    [{"role": "user", "content": "<image>\n请描述这张图中的主要物体和场景。"}, {"role": "assistant", "content": "一只狗。"}],
    [{"role": "system", "content": "你是minimind，请尽力帮助用户解决问题。"}, {"role": "user", "content": "What colour?<image>"},
     {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the shape?"},
     {"role": "assistant", "content": "a circle"}],
    [{"role": "user", "content": "a<image><image>b"}, {"role": "assistant", "content": "<think>\nlook\n</think>\n\nboth"},
     {"role": "system", "content": "a late system turn"}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nanswer\n", "reasoning_content": "\nwhy\n\n"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x<think>a</think>y</think>\n\nz"}],
    [{"role": "system", "content": "s1"}, {"role": "user", "content": "u"}, {"role": "system", "content": "s2"},
     {"role": "user", "content": "u2"}],
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return {g: transformers.AutoTokenizer.from_pretrained(str(UPSTREAM / g)) for g in GENERATIONS}


def upstream_template(g):
    return json.loads((UPSTREAM / g / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


@needs_upstream
@pytest.mark.parametrize("g", GENERATIONS)
def test_detects_upstream_templates(g):
    assert detect_template(upstream_template(g)) == g


@needs_upstream
@pytest.mark.parametrize("g", GENERATIONS)
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_equals_transformers(hf, g, k, gen):
    msgs = CONVERSATIONS[k]
    want = hf[g].apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render(g, msgs, gen) == want


@needs_upstream
def test_thinking_options_equal_transformers(hf):
    msgs = CONVERSATIONS[0]
    for value in (True, False):
        assert render("minimind-3v", msgs, True, open_thinking=value) == \
            hf["minimind-3v"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, open_thinking=value)
        assert render("minimind2-v", msgs, True, enable_thinking=value) == \
            hf["minimind2-v"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=value)


TEXT = st.lists(st.sampled_from(["\n", " ", "红色", "red", "<think>", "</think>", "<image>", "？", "\n\n", "ok"]),
                min_size=1, max_size=8).map("".join)


@needs_upstream
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), TEXT), turns=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
       gen=st.booleans())
def test_random_conversations_equal_transformers(hf, system, turns, gen):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if gen:
        msgs = msgs[:-1]
    for g in GENERATIONS:
        assert render(g, msgs, gen) == hf[g].apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


# ---------------------------------------------------------------------- always
def test_structure_without_upstream_files():
    msgs = [{"role": "user", "content": "hi<image>"}, {"role": "assistant", "content": "ok"}]
    turns = "<|im_start|>user\nhi<image><|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    assert render_chatml(msgs) == turns
    assert render("minimind2-v", msgs) == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n" + turns
    assert render("minimind2-v", [{"role": "system", "content": "s"}] + msgs[:1], True) == \
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<image><|im_end|>\n<|im_start|>assistant\n"
    assert render("minimind-3v", msgs, True) == turns.replace("assistant\nok", "assistant\n<think>\n\n</think>\n\nok") \
        + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert split_reasoning({"content": "<think>\nr\n</think>\n\na"}) == ("r", "a")
    assert split_reasoning({"content": "a", "reasoning_content": "r"}) == ("r", "a")


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("msgs, options, message", [
    ([{"role": "tool", "content": "x"}], {}, "role 'tool'"),
    ([{"role": "user", "content": [{"type": "text"}]}], {}, "content must be a string"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], {}, "tool_calls"),
    ([{"role": "user"}], {}, "must be a dict with 'role' and 'content'"),
    ([], {}, "non-empty list"),
    ([{"role": "user", "content": "x"}], {"tools": [{"name": "f"}]}, "does not take tools"),
])
def test_unrendered_features_are_errors(name, msgs, options, message):
    with pytest.raises(ValueError, match=message):
        render(name, msgs, **options)


def test_unknown_template_names_the_file():
    with pytest.raises(ValueError, match=r"my/tokenizer_config.json: unknown chat_template \(sha256 "):
        detect_template("{{ messages }}", "my/tokenizer_config.json")
    with pytest.raises(ValueError, match="my/tokenizer_config.json: no 'chat_template'"):
        detect_template(None, "my/tokenizer_config.json")
    with pytest.raises(ValueError, match="unknown chat template 'llama'"):
        render("llama", [{"role": "user", "content": "x"}])


@needs_upstream
def test_a_changed_upstream_template_is_not_accepted():
    text = upstream_template("minimind2-v").replace("You are a helpful assistant", "You are a pirate")
    assert template_hash(text) != template_hash(upstream_template("minimind2-v"))
    with pytest.raises(ValueError, match="unknown chat_template"):
        detect_template(text)
