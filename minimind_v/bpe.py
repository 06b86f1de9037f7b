"""Byte-level BPE in plain Python: reading a Hugging Face `tokenizer.json` and encoding with it.

Where it sits: beside `tokenizer.py`. Upstream MiniMind-V ships its vocabulary as a Hugging Face
`tokenizer.json` (byte-level BPE, the GPT-2 recipe). `tokenizer.load_tokenizer` reads such a file
with this module, so the project runs upstream's real vocabulary without the `tokenizers`
library at run time; the tests prove that the ids and the decoded text equal what `tokenizers`
gives on the same file.

Encoding a text is four steps, in this order (each one a section below):

1. added tokens: every special string in the vocabulary (`<|im_start|>`, `<think>`, ...) is cut
   out of the text first and becomes its own id; BPE only ever sees the text between them;
2. the split regex: the text between them is cut into "words" (letters with an optional leading
   space, digits, punctuation runs, whitespace runs), so that no merge crosses a word boundary;
3. bytes to characters: each word's UTF-8 bytes are written as 256 printable characters
   (GPT-2's byte table: a space is 'Ġ', a newline 'Ċ'), so every string has a spelling and the
   vocabulary is plain text;
4. merges by rank: the word starts as single characters, and the adjacent pair whose merge was
   learned earliest (lowest rank) is merged, again and again, until no pair has a rank.
   Each word's ids are cached, so a frequent word is merged only once.

Decoding runs the byte table backwards: the pieces' characters -> bytes -> UTF-8 text (an
incomplete character becomes U+FFFD, as `tokenizers` does).
"""
from __future__ import annotations

import functools
import heapq
import json
import re
import sys
import unicodedata
from pathlib import Path


# ---------------------------------------------------------------------- 1. the byte table
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte 0..255 -> one printable character (256 distinct characters).

    Bytes that are already visible, non-space characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (controls, space, DEL, the C1 controls 127-160 and the soft hyphen
    173) are given the characters from U+0100 up, in byte order: space (32) -> 'Ġ' (U+0120),
    newline (10) -> 'Ċ' (U+010A). A vocabulary file then never contains an invisible character.
    """
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse table: printable character -> byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


# ---------------------------------------------------------------------- 2. the split regex
# The ByteLevel pre-tokenizer of `tokenizers` (GPT-2's pattern):
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Python's `re` has no \p{..}, and its \s is not quite the regex engine's (it also counts the
# separators U+001C..U+001F). So the three classes are spelled out once, as explicit ranges:
#   \p{L}  every character whose Unicode general category starts with L (letters),
#   \p{N}  ... with N (digits, letter-like and other numbers),
#   \s     the Unicode White_Space property (the list below; it has not changed since Unicode 6).
# The categories are those of Python's own Unicode database (`unicodedata.unidata_version`,
# 14.0 on Python 3.11): a character assigned by a later Unicode version is unassigned here, and
# may be a letter to the regex engine of `tokenizers`. Every other character splits alike (a
# test runs all of them through both).
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
               (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
               (0x3000, 0x3000)]


def _ranges(predicate) -> list[tuple[int, int]]:
    """All code points c with predicate(c), as sorted inclusive ranges [(lo, hi), ...]."""
    out: list[list[int]] = []
    for cp in range(sys.maxunicode + 1):
        if predicate(cp):
            if out and out[-1][1] == cp - 1:
                out[-1][1] = cp
            else:
                out.append([cp, cp])
    return [(lo, hi) for lo, hi in out]


def _class_body(ranges: list[tuple[int, int]]) -> str:
    """Ranges -> the inside of a regex character class, e.g. 'a-z\\u00c0-\\u00d6'."""
    return "".join(re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}"
                   for lo, hi in ranges)


@functools.cache
def split_pattern() -> re.Pattern:
    """The ByteLevel split regex, compiled once (building the classes takes a fraction of a second)."""
    L = _class_body(_ranges(lambda c: unicodedata.category(chr(c))[0] == "L"))
    N = _class_body(_ranges(lambda c: unicodedata.category(chr(c))[0] == "N"))
    S = _class_body(WHITE_SPACE)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


def split_words(text: str) -> list[str]:
    """Text (without added tokens) -> its words, e.g. "I'm 7 ok!!\\n" -> ['I', "'m", ' 7', ' ok', '!!', '\\n']."""
    return split_pattern().findall(text)


# ---------------------------------------------------------------------- 3. merges by rank
def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge a word's symbols by rank: repeatedly join the adjacent pair learned earliest.

    symbols: the word's characters (after the byte table), e.g. ['Ġ', 'l', 'o', 'w'];
    ranks: (left, right) -> position of that merge in the file (0 = learned first).
    Each round finds the pair with the lowest rank anywhere in the word and joins every
    occurrence of it, left to right; the word is done when no adjacent pair has a rank.
    """
    symbols = list(symbols)
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                out.append(best[0] + best[1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def word_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """One word -> its BPE pieces: its UTF-8 bytes through the byte table, then merged by rank.

    e.g. ' lower' -> ['Ġlow', 'er'] (the pieces' spelling, as in the vocabulary).
    """
    table = bytes_to_unicode()
    return bpe_merge([table[b] for b in word.encode("utf-8")], ranks)


def pair_key(a: int, b: int) -> int:
    """One int for the pair of ids (a, b): a dict keyed by it is faster than one keyed by tuples."""
    return (a << 32) | b


def bpe_merge_ids(ids: list[int], merges: dict[int, tuple[int, int]]) -> list[int]:
    """`bpe_merge` on ids with a heap: the same result, in O(n log n) instead of O(n^2).

    ids: the word's byte pieces as vocabulary ids; merges: pair_key(left, right) -> (rank, id of
    the merged piece). The word is a linked list of ids; a heap holds (rank, position, merged id)
    of every adjacent pair that is a merge. The lowest rank is popped (ties: the leftmost, as
    `bpe_merge` merges left to right). The entry still applies if the pair now at that position
    is a merge that makes the same piece; if a neighbour was merged meanwhile it is stale and
    skipped. Otherwise the two are joined and the new pairs with the left and right neighbours
    are pushed. This is how `tokenizers` merges, stale check included.
    """
    n = len(ids)
    if n < 2:
        return list(ids)
    sym = list(ids)                           # sym[i]: the piece starting at i (-1 once merged away)
    nxt = list(range(1, n + 1))               # index of the next live piece (n = end)
    prv = list(range(-1, n - 1))              # index of the previous live piece (-1 = start)
    get = merges.get
    heap = []
    for i in range(n - 1):
        m = get((sym[i] << 32) | sym[i + 1])
        if m is not None:
            heap.append((m[0], i, m[1]))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _, i, new = pop(heap)
        j = nxt[i]
        if j >= n or sym[i] < 0:
            continue
        m = get((sym[i] << 32) | sym[j])
        if m is None or m[1] != new:
            continue                          # stale: the pair at i changed since this was pushed
        sym[i] = new
        sym[j] = -1
        k = nxt[i] = nxt[j]
        if k < n:                             # the new pair with the right neighbour
            prv[k] = i
            m = get((new << 32) | sym[k])
            if m is not None:
                push(heap, (m[0], i, m[1]))
        h = prv[i]
        if h >= 0:                            # ... and with the left neighbour
            m = get((sym[h] << 32) | new)
            if m is not None:
                push(heap, (m[0], h, m[1]))
    return [t for t in sym if t >= 0]


def byte_decode(tokens: list[str]) -> str:
    """Pieces -> text: each piece's characters back to bytes, then UTF-8 (bad bytes -> U+FFFD).

    A piece with a character outside the byte table (an added token such as '<|im end|>' with a
    space in it) contributes its own UTF-8 bytes, as the ByteLevel decoder of `tokenizers` does.
    """
    table = unicode_to_bytes()
    data = bytearray()
    for tok in tokens:
        if all(c in table for c in tok):
            data.extend(table[c] for c in tok)
        else:
            data.extend(tok.encode("utf-8"))
    return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------- 4. the tokenizer.json file
class ByteLevelBPE:
    """A byte-level BPE vocabulary read from a `tokenizer.json`: `encode(text) -> ids`, `decode(ids) -> text`.

    Supported (what upstream MiniMind-V's files and a `tokenizers` ByteLevel BPE use): model
    BPE with `vocab` and ranked `merges` (either "a b" strings or [a, b] lists), no normalizer,
    the ByteLevel pre-tokenizer without a prefix space, the ByteLevel decoder, and added tokens
    matched exactly (no lstrip / rstrip / single_word). Anything else is a clear error naming the
    file and the key, rather than a tokenization that silently differs.
    """

    CACHE_SIZE = 200_000      # words whose ids are kept; the cache is emptied when it is full

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 added_tokens: dict[str, int], special: set[str] = frozenset(),
                 use_regex: bool = True, source: str = "<memory>"):
        self.source = source
        self.vocab = vocab                                     # piece -> id
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.added_tokens = dict(added_tokens)                 # string -> id
        self.special = set(special)                            # the added tokens marked special
        self.use_regex = use_regex
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added_tokens.items()})
        missing = [c for c in bytes_to_unicode().values() if c not in vocab]
        if missing:
            raise ValueError(f"{source}: the vocab lacks {len(missing)} of the 256 byte characters "
                             f"(e.g. {missing[:3]}); a byte-level BPE needs all of them")
        for a, b in merges:
            for piece in (a, b, a + b):
                if piece not in vocab:
                    raise ValueError(f"{source}: merge {a!r} + {b!r} needs {piece!r}, which is not in the vocab")
        # leftmost-longest matching of the added tokens: longer strings first in the alternation
        names = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._byte_id = [vocab[c] for c in bytes_to_unicode().values()]      # byte -> id of its piece
        self.merges = {pair_key(vocab[a], vocab[b]): (r, vocab[a + b]) for (a, b), r in self.ranks.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, path) -> "ByteLevelBPE":
        """Read a Hugging Face `tokenizer.json`, checking every setting this class relies on."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON tokenizer file ({e})") from None

        def need(cond, key, expected, got):
            if not cond:
                raise ValueError(f"{path}: {key} must be {expected}, got {got!r}")

        need(isinstance(spec, dict) and isinstance(spec.get("model"), dict), "'model'",
             "an object (a Hugging Face tokenizer.json)", type(spec.get("model") if isinstance(spec, dict) else spec).__name__)
        model = spec["model"]
        need(model.get("type") == "BPE", "model.type", "'BPE'", model.get("type"))
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            need(model.get(key) in (None, ""), f"model.{key}", "null", model.get(key))
        need(not model.get("ignore_merges", False), "model.ignore_merges", "false", model.get("ignore_merges"))
        need(spec.get("normalizer") is None, "normalizer", "null", spec.get("normalizer"))
        pre = spec.get("pre_tokenizer") or {}
        need(pre.get("type") == "ByteLevel", "pre_tokenizer.type", "'ByteLevel'", pre.get("type"))
        need(not pre.get("add_prefix_space", False), "pre_tokenizer.add_prefix_space", "false",
             pre.get("add_prefix_space"))
        dec = spec.get("decoder") or {}
        need(dec.get("type") == "ByteLevel", "decoder.type", "'ByteLevel'", dec.get("type"))
        vocab = model.get("vocab")
        need(isinstance(vocab, dict) and vocab, "model.vocab", "a non-empty {piece: id} object", type(vocab).__name__)

        merges = []
        for k, m in enumerate(model.get("merges") or []):
            if isinstance(m, str) and m.count(" ") == 1:
                merges.append(tuple(m.split(" ")))
            elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
                merges.append(tuple(m))
            else:
                raise ValueError(f"{path}: model.merges[{k}] must be 'a b' or ['a', 'b'], got {m!r}")

        added, special = {}, set()
        for k, t in enumerate(spec.get("added_tokens") or []):
            for flag in ("lstrip", "rstrip", "single_word"):
                need(not t.get(flag, False), f"added_tokens[{k}].{flag}", "false", t.get(flag))
            added[t["content"]] = t["id"]
            if t.get("special"):
                special.add(t["content"])
        return cls(vocab, merges, added, special, use_regex=pre.get("use_regex", True), source=str(path))

    # ------------------------------------------------------------------ text -> ids
    def __len__(self) -> int:
        return max(self.id_to_token) + 1

    def encode(self, text: str) -> list[int]:
        """Text -> ids: added tokens cut out first, then each word through the byte table and the merges."""
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                if m.start() > pos:
                    ids += self._encode_plain(text[pos:m.start()])
                ids.append(self.added_tokens[m.group()])
                pos = m.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:])
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Text with no added tokens -> ids (words from the split regex, merged, cached)."""
        ids: list[int] = []
        cache = self._cache
        for word in (split_words(text) if self.use_regex else [text]):
            hit = cache.get(word)
            if hit is None:
                hit = bpe_merge_ids([self._byte_id[b] for b in word.encode("utf-8")], self.merges)
                if len(cache) >= self.CACHE_SIZE:
                    cache.clear()
                cache[word] = hit
            ids += hit
        return ids

    # ------------------------------------------------------------------ ids -> text
    def decode(self, ids) -> str:
        """Ids -> text (added and special tokens written out as their strings)."""
        tokens = []
        for i in ids:
            tok = self.id_to_token.get(int(i))
            if tok is None:
                raise ValueError(f"{self.source}: id {int(i)} is not in the vocabulary (0..{len(self) - 1})")
            tokens.append(tok)
        return byte_decode(tokens)

    def token_to_id(self, piece: str) -> int | None:
        return self.added_tokens.get(piece, self.vocab.get(piece))
