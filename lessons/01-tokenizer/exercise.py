"""Lesson 01 exercises: BPE from scratch, the chat template, the image placeholder run.

Run `pytest lessons/01-tokenizer` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

REFERENCE = {
    "bpe_train": "minimind_v.tokenizer:bpe_train",
    "bpe_encode": "minimind_v.tokenizer:bpe_encode",
    "chat_template": "minimind_v.tokenizer:chat_template",
    "encode_content": "minimind_v.tokenizer:Tokenizer.encode_content",
}


def bpe_train(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to `num_merges` BPE merges from a list of words (repeats count).

    Start from characters. Each round: count adjacent piece pairs over all words (weighted by
    frequency), pick the most frequent pair (ties: the pair first seen, scanning words in
    first-seen order and pieces left to right), merge it everywhere, record it. Stop early
    when no pair is left. Returns the merges in the order learned, e.g. [('e', 's'), ('es', 't')].
    """
    raise NotImplementedError


def bpe_encode(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Cut `word` into pieces: start from characters, apply each merge in order (left to right)."""
    raise NotImplementedError


def chat_template(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """ChatML: '<|im_start|>{role}\\n{content}<|im_end|>\\n' per message; with
    add_generation_prompt, end with '<|im_start|>assistant\\n'."""
    raise NotImplementedError


def encode_content(tok, content: str, num_patches: int) -> list[int]:
    """One message's content -> ids with `tok` (a minimind_v Tokenizer): encode the text between
    `<image>` markers with `tok.encode`, and put `num_patches` copies of `tok.image_pad_id` where
    each `<image>` stands."""
    raise NotImplementedError
