"""Lesson 01 exercises: BPE from scratch, byte-level BPE, the chat template, the image placeholder run.

Run `pytest lessons/01-tokenizer` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

REFERENCE = {
    "bpe_train": "minimind_v.tokenizer:bpe_train",
    "bpe_encode": "minimind_v.tokenizer:bpe_encode",
    "chat_template": "minimind_v.tokenizer:chat_template",
    "encode_content": "minimind_v.tokenizer:Tokenizer.encode_content",
    "bytes_to_unicode": "minimind_v.bpe:bytes_to_unicode",
    "split_words": "minimind_v.bpe:split_words",
    "bpe_merge": "minimind_v.bpe:bpe_merge",
    "word_pieces": "minimind_v.bpe:word_pieces",
    "byte_decode": "minimind_v.bpe:byte_decode",
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


# ---------------------------------------------------------------------- byte-level BPE (upstream's vocabulary)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte table: each byte 0..255 -> one printable character, 256 distinct ones.

    Bytes in '!'..'~' (33-126), '¡'..'¬' (161-172) and '®'..'ÿ' (174-255) map to the character
    with the same code. The other 68 bytes (0-32, 127-160, 173), in increasing order, map to
    chr(256), chr(257), ...: so 0 -> 'Ā', 32 (space) -> 'Ġ', 127 -> 'ġ'.
    Returns {byte: character}, 256 entries.
    """
    raise NotImplementedError


def split_words(text: str) -> list[str]:
    """Cut text into the words BPE merges within (the ByteLevel split regex of `tokenizers`):

        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

    tried left to right at each position: a lower-case contraction; letters, digits, or other
    symbols, each with an optional leading space; whitespace not followed by a non-space; any
    other whitespace. \\p{L} / \\p{N}: Unicode categories L* / N* (`unicodedata.category`);
    \\s: Unicode White_Space (tab to carriage return, space, U+0085, U+00A0, U+1680,
    U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000). Python's `re` has no \\p{..}:
    build the character classes yourself. The words concatenate back to `text`.
    e.g. "I'm 7 ok!!\\n" -> ['I', "'m", ' 7', ' ok', '!!', '\\n'].
    """
    raise NotImplementedError


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge a word's symbols by rank. ranks: (left, right) -> the merge's position in the merge list.

    Repeat: among all adjacent pairs, take the one with the lowest rank; join every occurrence
    of it, left to right; stop when no adjacent pair has a rank. Returns the pieces (len <= len(symbols)).
    e.g. ['a', 'b', 'c'] with {('b', 'c'): 0, ('a', 'b'): 1} -> ['a', 'bc'].
    """
    raise NotImplementedError


def word_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """One word -> its pieces: its UTF-8 bytes through `bytes_to_unicode`, then `bpe_merge`.

    e.g. ' 红' (4 bytes) starts as ['Ġ', 'ç', 'º', '¢'].
    """
    raise NotImplementedError


def byte_decode(tokens: list[str]) -> str:
    """Pieces -> text: every character back to its byte (the inverse table), all bytes joined,
    then decoded as UTF-8 with errors='replace' (a cut character becomes U+FFFD). A piece with
    a character outside the table (an added token like '<a b>') contributes its own UTF-8 bytes.
    Decode the bytes of all pieces together: one Chinese character's 3 bytes may sit in 2 pieces.
    """
    raise NotImplementedError
