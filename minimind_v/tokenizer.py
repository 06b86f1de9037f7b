"""The tokenizer: text <-> token ids, the chat template, and the image placeholder run.

Where it sits: the first and last step of the data flow. `data.py` turns each conversation into
ids with `encode_conversation`; the model sees ids; `generate` produces ids that `decode` turns
back into text.

`bpe_train` / `bpe_encode` below spell out the BPE algorithm in plain Python for learning; the
real vocabulary is trained by sentencepiece.

What it is: a byte-fallback BPE model trained with sentencepiece (6400 pieces by default, the
size of upstream MiniMind-V's vocabulary), plus a handful of special tokens:

    id 0  <|endoftext|>   padding (and end of a plain document)
    id 1  <|im_start|>    starts a chat turn        (bos_id)
    id 2  <|im_end|>      ends a chat turn          (eos_id: generation stops here)
    id 3  <|image_pad|>   one patch of an image     (image_pad_id)
    id 4  <unk>           never produced: byte fallback covers every string

Why byte fallback: a character the BPE never saw (a rare Chinese character, an emoji) is spelled
as its UTF-8 bytes, one token per byte (`<0xF0> <0x9F> <0x98> <0x80>`), so no text is ever unknown
and `decode(encode(s)) == s` for every string. Normalisation is switched off for the same reason.

The chat template is ChatML, as upstream MiniMind-V's:

    <|im_start|>{role}\n{content}<|im_end|>\n      ... and `<|im_start|>assistant\n` as the
                                                       generation prompt

An image is written `<image>` in a message. The model needs one position per image patch, so
`encode_conversation` replaces it with a run of `num_patches` copies of `image_pad_id`. The
special token is a single piece of its own that BPE never merges with neighbouring text, so
the run is always exactly `num_patches` long. (Upstream MiniMind2-V uses the ordinary character
'@' (id 34) repeated 196 times; a dedicated token cannot collide with an '@' in the text.)

Upstream MiniMind-V's own vocabularies: `load_tokenizer(path)` also reads a Hugging Face
`tokenizer.json` (byte-level BPE, read by our `bpe.py`) with its `tokenizer_config.json`, and
returns a `BPETokenizer` with the same interface, upstream's chat template (`templates.py`),
upstream's image run (MiniMind2-V: '@' x 196, id 34; minimind-3v: `<|image_pad|>` x 64, id 12)
and upstream's labels (see `label_newline`).

Labels and the newline: after each assistant reply the template writes `<|im_end|>\n`. Our
sentencepiece tokenizers learn the reply and its `<|im_end|>`; upstream MiniMind-V also learns
the `\n` after it. `label_newline` (an attribute of every tokenizer here, False for ours, True
for upstream's, settable) says which, and `encode_conversation` honours it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import sentencepiece as spm

from .hf_tokenizer import BPETokenizer
from .templates import BOS, EOS, IMAGE_PAD, IMAGE_TOKEN, PAD, SPECIAL_TOKENS, UNK  # noqa: F401 (re-exported)

__all__ = ["PAD", "BOS", "EOS", "IMAGE_PAD", "UNK", "SPECIAL_TOKENS", "IMAGE_TOKEN", "Tokenizer", "load_tokenizer"]

SPACE_MARK = "\u2581"                         # '▁': sentencepiece's internal stand-in for a space


def chat_template(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """ChatML: one `<|im_start|>{role}\\n{content}<|im_end|>\\n` block per message."""
    text = "".join(f"{BOS}{m['role']}\n{m['content']}{EOS}\n" for m in messages)
    return text + (f"{BOS}assistant\n" if add_generation_prompt else "")


def conversation_text(record: dict) -> str:
    """The training text of one JSONL record: its conversation in the chat template, images removed."""
    messages = [{"role": m["role"], "content": m["content"].replace(IMAGE_TOKEN, "")}
                for m in record["conversations"]]
    return chat_template(messages)


# ---------------------------------------------------------------------- BPE, the idea in 30 lines
def bpe_train(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair encoding from scratch: the merge list learned from a list of words.

    Start with every word cut into characters. Repeatedly count every adjacent pair of pieces
    (weighted by how often the word occurs), merge the most frequent pair everywhere, and record
    it. Ties go to the pair seen first. sentencepiece's BPE trainer does the same, faster, on
    whole sentences (a space is just the character '▁').
    """
    counts = Counter(words)                       # word -> frequency, in first-seen order
    pieces = {w: list(w) for w in counts}         # word -> its current pieces
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, n in counts.items():
            for pair in zip(pieces[w], pieces[w][1:]):
                pairs[pair] += n
        if not pairs:                             # every word is a single piece
            break
        best = max(pairs, key=pairs.__getitem__)  # first of the most frequent
        merges.append(best)
        pieces = {w: merge_pair(p, best) for w, p in pieces.items()}
    return merges


def merge_pair(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every adjacent (a, b) in `pieces`, left to right, by a + b."""
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def bpe_encode(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Cut a word with a learned merge list: characters, then every merge in the order learned."""
    pieces = list(word)
    for pair in merges:
        pieces = merge_pair(pieces, pair)
    return pieces


class Tokenizer:
    """A trained sentencepiece BPE model with upstream MiniMind-V's special tokens and ChatML."""

    template = "chatml"          # the chat template this tokenizer renders (templates.py)

    def __init__(self, model_file: str | os.PathLike, label_newline: bool = False):
        self.label_newline = label_newline   # True: the '\n' after an assistant's <|im_end|> is learned too
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer model {model_file} does not exist")
        self.model_file = model_file
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_file} is not a sentencepiece model ({e})") from None
        for expected_id, piece in enumerate(SPECIAL_TOKENS):
            if self.sp.piece_to_id(piece) != expected_id:
                raise ValueError(f"{model_file}: special token {piece!r} should have id {expected_id}, "
                                 f"has {self.sp.piece_to_id(piece)} (was it trained with Tokenizer.train?)")
        self.pad_id, self.bos_id, self.eos_id, self.image_pad_id = range(4)
        self.special_ids = {piece: i for i, piece in enumerate(SPECIAL_TOKENS)}
        # a literal '▁' in the text would decode as a space, so it is always spelled as its 3 bytes
        self._space_mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, input_files, out_prefix, vocab_size: int = 6400,
              user_defined_symbols: list[str] = (), character_coverage: float = 0.9995,
              max_sentences: int = 2_000_000, num_threads: int = 1) -> "Tokenizer":
        """Train a BPE model on JSONL conversations (`.jsonl`) or plain text files (one line each).

        Writes `out_prefix.model` and `out_prefix.vocab` and returns the loaded tokenizer.
        `user_defined_symbols` are extra strings kept as single pieces wherever they occur (the
        demo passes its answer words so that each is one whole token). On a small corpus the
        vocabulary may come out smaller than `vocab_size` (it stops when nothing is left to merge);
        `len(tokenizer)` is the real size.
        """
        files = [Path(f) for f in ([input_files] if isinstance(input_files, (str, os.PathLike)) else input_files)]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer training input {f} does not exist")
        out_prefix = Path(out_prefix)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        sentences = list(_training_sentences(files, max_sentences))   # read (and check) everything first
        extra = [s for s in dict.fromkeys(user_defined_symbols) if s and s not in SPECIAL_TOKENS]
        try:
            _train_sentencepiece(sentences, out_prefix, vocab_size, character_coverage, extra, num_threads)
        except RuntimeError as e:
            if "Vocabulary size is smaller than required_chars" in str(e):
                raise ValueError(f"vocab_size {vocab_size} is too small: it must hold 4 special tokens, "
                                 f"<unk>, the 256 byte pieces, {len(extra)} user symbols and every kept "
                                 f"character ({str(e).split('.')[-3].strip()})") from None
            raise
        return cls(f"{out_prefix}.model")

    # ------------------------------------------------------------------ text <-> ids
    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings in the text (e.g. '<|im_end|>') become their single ids."""
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids += self._space_mark_ids
            if part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids) -> str:
        """Ids -> text (special tokens are written out as their strings)."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def pieces(self, text: str) -> list[str]:
        """How `text` is cut: the piece of every id (handy for looking at a tokenization)."""
        return [self.id_to_piece(i) for i in self.encode(text)]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Messages [{'role', 'content'}, ...] -> the ChatML text (`<image>` left as written)."""
        return chat_template(messages, add_generation_prompt)

    def encode_content(self, content: str, num_patches: int) -> list[int]:
        """One message's content -> ids, each `<image>` replaced by `num_patches` image-pad ids."""
        ids: list[int] = []
        for i, text in enumerate(content.split(IMAGE_TOKEN)):
            if i:
                ids += [self.image_pad_id] * num_patches
            ids += self.encode(text)
        return ids

    def encode_conversation(self, messages: list[dict], num_patches: int = 196,
                            add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Messages -> (ids, is_target): the chat template as ids, and which ids the model must learn.

        Every piece of the template is encoded on its own (`<|im_start|>`, `{role}\\n`, content,
        `<|im_end|>`, `\\n`), so the boundaries between them never shift with the text around, and
        training and chat see the same ids. `is_target` is True exactly on the assistant's content
        and its closing `<|im_end|>` (that is where the loss is taken), and on the `\n` after it
        when `label_newline` is set (as upstream MiniMind-V labels).
        """
        ids: list[int] = []
        target: list[bool] = []

        def add(new_ids, is_target):
            ids.extend(new_ids)
            target.extend([is_target] * len(new_ids))

        for m in messages:
            learn = m["role"] == "assistant"
            add([self.bos_id] + self.encode(f"{m['role']}\n"), False)
            add(self.encode_content(m["content"], num_patches) + [self.eos_id], learn)
            add(self.encode("\n"), learn and self.label_newline)
        if add_generation_prompt:
            add([self.bos_id] + self.encode("assistant\n"), False)
        return ids, target


def load_tokenizer(path, template: str | None = None, label_newline: bool | None = None,
                   image_token: str | None = None):
    """A tokenizer from a file or folder -> an object with the `Tokenizer` interface.

    path: a sentencepiece `.model` (-> `Tokenizer`), a Hugging Face `tokenizer.json` (-> `BPETokenizer`,
    with the `tokenizer_config.json` beside it), or a folder holding either.
    template: the chat template by name (one of templates.TEMPLATES) instead of detecting it
    from `tokenizer_config.json` (needed for a tokenizer.json without a known template).
    label_newline: override the default (False for sentencepiece, True for a tokenizer.json).
    image_token: the image placeholder of a tokenizer.json (default: the config's `image_token`,
    else '@' as MiniMind2-V).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        else:
            models = sorted(path.glob("*.model"))
            if len(models) != 1:
                raise FileNotFoundError(f"{path}: expected tokenizer.json (with tokenizer_config.json), "
                                        f"tokenizer.model or one .model file; found "
                                        f"{[p.name for p in models] or 'none'}")
            path = models[0]
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.suffix == ".model":
        if template not in (None, "chatml") or image_token is not None:
            raise ValueError(f"{path}: a sentencepiece tokenizer renders the 'chatml' template with "
                             f"{IMAGE_PAD}; template/image_token cannot be changed")
        return Tokenizer(path, label_newline=bool(label_newline))
    if path.name == "tokenizer_config.json":
        path = path.parent / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (beside its tokenizer_config.json)")
    config_file = path.parent / "tokenizer_config.json"
    config = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object")
    elif template is None:
        raise FileNotFoundError(f"{config_file} does not exist: a tokenizer.json needs its tokenizer_config.json "
                                f"(for the chat template and special tokens), or pass template=NAME")
    return BPETokenizer(path, config, config_file if config is not None else None, template=template,
                        label_newline=True if label_newline is None else label_newline, image_token=image_token)


def _train_sentencepiece(sentences, out_prefix, vocab_size, character_coverage, extra, num_threads):
    """The sentencepiece settings that make upstream MiniMind-V's vocabulary layout and exact round trips."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(out_prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True,                    # unseen characters -> UTF-8 bytes, never <unk>
        character_coverage=character_coverage, # rarest characters left to the byte fallback
        normalization_rule_name="identity",    # no NFKC: decode(encode(s)) must give s back
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=1 << 16, hard_vocab_limit=False,
        pad_id=-1, bos_id=-1, eos_id=-1, unk_id=len(SPECIAL_TOKENS), unk_piece=UNK,
        user_defined_symbols=SPECIAL_TOKENS + extra,   # ids 0..3, always single pieces
        num_threads=num_threads, minloglevel=2)


def _training_sentences(files: list[Path], max_sentences: int):
    """Yield training text: one templated conversation per JSONL record, or one line per text line."""
    n = 0
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if n >= max_sentences:
                    return
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if f.suffix == ".jsonl":
                    try:
                        text = conversation_text(json.loads(line))
                    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                        raise ValueError(f"{f}:{lineno}: expected a JSON object with 'conversations' "
                                         f"[{{'role', 'content'}}, ...]: {e}") from None
                else:
                    text = line
                n += 1
                yield text


# ---------------------------------------------------------------------- command line
def cli(argv: list[str]) -> int:
    """`minimind-v tokenizer train|encode ...`"""
    parser = argparse.ArgumentParser(prog="minimind-v tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer on JSONL conversations or text files")
    t.add_argument("inputs", nargs="+", help=".jsonl conversation files or plain text files")
    t.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
    t.add_argument("--vocab-size", type=int, default=6400)
    t.add_argument("--symbols", default="", help="comma-separated strings to keep as single pieces")
    t.add_argument("--answer-words", action="store_true",
                   help="also keep the generated dataset's answer words whole (synthetic.answer_words())")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    e = sub.add_parser("encode", help="show how a text is tokenized")
    e.add_argument("--model", required=True, help="a .model file, a tokenizer.json, or a folder with either")
    e.add_argument("text")
    args = parser.parse_args(argv)
    if args.action == "train":
        symbols = [s for s in args.symbols.split(",") if s]
        if args.answer_words:
            from .synthetic import answer_words
            symbols += answer_words()
        tok = Tokenizer.train(args.inputs, args.out, args.vocab_size, user_defined_symbols=symbols,
                              character_coverage=args.character_coverage)
        print(f"wrote {tok.model_file} ({len(tok)} pieces)")
    else:
        tok = load_tokenizer(args.model)
        ids = tok.encode(args.text)
        print(f"{len(ids)} tokens")
        for i in ids:
            print(f"{i:6d}  {tok.id_to_piece(i)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
