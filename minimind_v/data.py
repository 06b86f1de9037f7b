"""Conversation datasets: JSONL or Parquet records with images -> token ids, loss labels and pixel values.

Where it sits: between the files on disk and the training loop. Each line of a JSONL file is one
record in upstream MiniMind-V's (first-generation) format:

    {"conversations": [{"role": "user", "content": "闹钟的位置对睡眠质量有什么影响？<image>"},
                       {"role": "assistant", "content": "把数字闹钟放在床头柜..."}],
     "image": "train-00000-of-00001_image_0_0.jpg"}

Several images: comma-separated names (or a JSON list), one `<image>` each, in order. Turns may
start with one "system" turn, then alternate user / assistant and end with an assistant reply.
Other keys of a record (e.g. "qtype", "lang", "answer") are kept in `Sample.extra`.

Parquet (upstream MiniMind-V's current format; needs the optional `pyarrow`, the `parquet` extra):
one row per record, column `conversations` holding the turns as a JSON string (or as a list of
{role, content} structs) and column `image_bytes` holding the encoded picture file (PNG, JPEG, ...)
as binary, or a list of them for several images, in `<image>` order. Other columns go to `extra`.
Upstream fills the image column of its text-only rows with a small black placeholder picture and
writes no `<image>`: such a row is a text-only record here, and its unused pictures are counted
in `summary()`. Rows are numbered from 0 in messages ("file.parquet: row 12: ..."); a row's
pictures are named `file.parquet#row12/0`, `.../1` (`Sample.images`, `image_paths`), keys that
are unique like file paths.

Pretraining (captions) and SFT (conversations) use this same format and this same class, as
upstream MiniMind-V does: what differs between the stages is the data and which parameters
learn, not the reading. So there is one `VLMDataset` and no stage flag.

An item is a dict:
    input_ids    (T,)        long   the chat template as ids; each `<image>` -> `num_patches` image-pad ids
    labels       (T,)        long   = input_ids on the assistant replies and their `<|im_end|>`, else -100
    pixel_values (N, 3, S, S) float  one CLIP-normalised picture per image run kept in input_ids
    image_paths  [N] str             the resolved image files (a key for caching vision features)

With `load_pixels=False` (settable at any time) items leave out `pixel_values`: a trainer that
caches the frozen encoder's features by image path need not decode pictures again.

`labels` are NOT shifted: labels[t] is the token at position t. The loss compares the logits at
position t with the label at t + 1:  cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100).

Records longer than `max_length` are cut at `max_length`, moved back to the start of an image run
if the cut would split one (a half image cannot be spliced); images cut off are dropped.
A record whose every reply token is cut away would have nothing to learn (a batch of only such
records gives a loss of 0/0 = nan), so each record is encoded once at load time and those are
skipped, counted and named in `summary()` and the load-time warning, whatever `skip_bad` says.
`collate` pads a batch on the right (pad id, label -100, zero pictures).

Bad records (bytes that are not UTF-8, malformed JSON, missing keys, a missing or unreadable image,
more or fewer `<image>` than images, empty or out-of-order turns) raise `BadRecord` naming the file
and line (or row); with `skip_bad=True` they are skipped and counted, and `summary()` says how
many of each and shows the first few with their reasons.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from .image import BadImage, open_image, read_pixels
from .lm import IGNORE  # noqa: F401  (-100: the label of every token the loss skips; data.IGNORE)
from .tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS

SHOWN_SKIPS = 5  # skipped records quoted in summary()
PARQUET_CONVERSATIONS, PARQUET_IMAGES = "conversations", "image_bytes"   # upstream MiniMind-V's columns


class BadRecord(ValueError):
    """A record that cannot be used; the message starts with `file:line:` (Parquet: `file: row N:`)."""

    def __init__(self, path, lineno: int, reason: str, detail: str, row: bool = False):
        super().__init__(f"{path}: row {lineno}: {detail}" if row else f"{path}:{lineno}: {detail}")
        self.reason = reason     # a short category for the skip summary


class Sample(NamedTuple):
    """One usable record: where it is, its turns, its pictures, and its other keys."""
    lineno: int                  # JSONL line (from 1) or Parquet row (from 0)
    messages: list[dict]         # [{"role", "content"}, ...], checked
    images: list[Path]           # one per <image>, in order (Parquet: `file#rowN/k` names)
    extra: dict                  # the record's keys other than conversations / image(_bytes)


# ---------------------------------------------------------------------- reading and checking
def check_turns(turns, bad) -> list[dict]:
    """The 'conversations' value -> checked messages, or bad(reason, detail) saying what was expected."""
    if not isinstance(turns, list) or not turns:
        raise bad("bad turns", "'conversations' must be a non-empty list of {'role', 'content'} turns")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise bad("bad turns", f"turn {k}: expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in turn:
                raise bad("missing key", f"turn {k}: missing key '{key}'")
            if not isinstance(turn[key], str):
                raise bad("bad turns", f"turn {k}: '{key}' must be a string")
        role, content = turn["role"], turn["content"]
        first = 1 if messages and messages[0]["role"] == "system" else 0
        expected = ("user", "assistant")[(k - first) % 2]
        if not (k == 0 and role == "system") and role != expected:
            raise bad("bad turns", f"turn {k}: expected role '{expected}', got '{role}' "
                                   "(an optional system turn, then user and assistant alternating)")
        if not content.strip():
            raise bad("bad turns", f"turn {k}: empty content")
        for special in SPECIAL_TOKENS:
            if special in content:
                raise bad("bad turns", f"turn {k}: content contains the special token {special!r}")
        if role == "assistant" and IMAGE_TOKEN in content:
            raise bad("bad turns", f"turn {k}: {IMAGE_TOKEN} in an assistant reply (images belong to user turns)")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise bad("bad turns", f"the last turn is '{messages[-1]['role']}'; expected an assistant reply to learn")
    return messages


def count_placeholders(messages: list[dict]) -> int:
    return sum(m["content"].count(IMAGE_TOKEN) for m in messages)


def parse_record(line: str, path, lineno: int, image_root: Path) -> tuple[list[dict], list[Path], dict]:
    """One JSONL line -> (messages, image paths, extra keys), or BadRecord saying what is wrong and what was expected."""
    def bad(reason, detail):
        return BadRecord(path, lineno, reason, detail)

    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise bad("malformed JSON", f"malformed JSON ({e})") from None
    if not isinstance(rec, dict):
        raise bad("malformed JSON", f"expected a JSON object, got {type(rec).__name__}")
    if "conversations" not in rec:
        raise bad("missing key", "missing key 'conversations' (a list of {'role', 'content'} turns)")
    messages = check_turns(rec["conversations"], bad)

    n_placeholders = count_placeholders(messages)
    names = rec.get("image", [])
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")] if names.strip() else []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise bad("bad images", "'image' must be a comma-separated string of file names or a list of them")
    if "image" not in rec and n_placeholders:
        raise bad("missing key", f"missing key 'image' (the conversation has {n_placeholders} {IMAGE_TOKEN})")
    if len(names) != n_placeholders:
        raise bad("image count mismatch", f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) but {len(names)} "
                                          f"image(s) {names}; expected one {IMAGE_TOKEN} per image")
    extra = {k: v for k, v in rec.items() if k not in ("conversations", "image")}
    return messages, [image_root / n for n in names], extra


_CHECKED: set[tuple] = set()   # (path, size, mtime) of picture files this process decoded without a problem


def check_image_file(path: Path, source, lineno: int) -> None:
    """Decode a picture file once to be sure it reads (BadRecord naming it and the record otherwise).

    A file already decoded by this process, unchanged since (same size and modification time), is
    not decoded again: the demo's caption and question sets share their pictures, and `eval` reads
    the same files as `train`."""
    try:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None                                  # missing or unreadable: load_image says which
    if key is not None and key in _CHECKED:
        return
    load_image(path, source, lineno)
    if key is not None:
        _CHECKED.add(key)


def load_image(path: Path, source, lineno: int, data: bytes | None = None, row: bool = False) -> Image.Image:
    """Open and fully decode a picture (`image.open_image`), or BadRecord naming it and the record that uses it."""
    try:
        return open_image(path, data)
    except BadImage as e:
        reason = "image missing" if e.problem == "not found" else "image unreadable"
        raise BadRecord(source, lineno, reason, str(e), row) from None


# ---------------------------------------------------------------------- ids and labels
def image_run_starts(ids: list[int], pad_id: int, L: int) -> list[int]:
    """Where the image runs of one row start: `splice.runs_of_one_id` for a plain list, in Python
    (a tensor per record costs more than the scan). Every block of consecutive placeholders is cut
    into runs of L from its first position; a remainder shorter than L is no image."""
    starts, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] != pad_id:
            i += 1
            continue
        j = i
        while j < n and ids[j] == pad_id:
            j += 1
        starts.extend(range(i, j - L + 1, L))       # block [i, j): runs at i, i+L, ... ending by j
        i = j
    return starts


def truncate(ids: list[int], target: list[bool], max_length: int, image_pad_id: int,
             num_patches: int) -> tuple[list[int], list[bool], int]:
    """Cut to `max_length` without splitting an image run -> (ids, target, images kept).

    The runs are the splice's (`image_run_starts`: greedy, left to right, no overlap), so a
    stray pad id in the text (MiniMind2-V's placeholder is the ordinary '@' token) is no image."""
    runs = image_run_starts(ids, image_pad_id, num_patches)
    cut = min(len(ids), max_length)
    for s in runs:
        if s < cut < s + num_patches:                 # the cut falls inside this image: back up before it
            cut = s
    return ids[:cut], target[:cut], sum(s + num_patches <= cut for s in runs)


def encode_sample(tokenizer, messages: list[dict], max_length: int,
                  num_patches: int) -> tuple[list[int], list[int], int]:
    """Messages -> (input_ids, labels, images kept): the template as ids, -100 outside the replies."""
    ids, target = tokenizer.encode_conversation(messages, num_patches)
    ids, target, n_images = truncate(ids, target, max_length, tokenizer.image_pad_id, num_patches)
    labels = [t if learn else IGNORE for t, learn in zip(ids, target)]
    return ids, labels, n_images


class VLMDataset(torch.utils.data.Dataset):
    """A JSONL or Parquet file of image conversations (pretrain captions or SFT Q&A; same format).

    `samples` lists the usable records as `Sample`s; `skipped` counts the others by reason and
    `bad_lines` holds their messages (file, line or row, what was wrong), `summary()` both.
    """

    def __init__(self, jsonl_path, image_root, tokenizer, max_length: int, num_patches: int = 196,
                 image_size: int = 224, skip_bad: bool = False, check_images: bool = True,
                 load_pixels: bool = True, keep_encoded: bool = False, transform=None, alpha: str = "white"):
        self.path = Path(jsonl_path)
        self.transform = transform        # another encoder's preprocessing (SigLIP's), else CLIP's
        self.alpha = alpha                # "white" (ours) or "drop" (upstream's convert('RGB'))
        self.is_parquet = self.path.suffix.lower() == ".parquet"
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_patches = num_patches
        self.image_size = image_size
        self.skip_bad = skip_bad
        self.check_images = check_images
        self.load_pixels = load_pixels    # False: items carry image_paths only (vision features cached elsewhere)
        # True: keep each sample's token ids (computed once at load time for the cut-away check),
        # for a small dataset seen for many epochs (the demo's); a large one would hold them all in
        # memory, so it is opt-in
        self.encoded: dict[int, tuple] | None = {} if keep_encoded else None
        self.samples: list[Sample] = []
        self.skipped: Counter = Counter()       # reason -> records skipped
        self.bad_lines: list[str] = []          # their messages, in file order
        self.unused_images = 0                  # Parquet: pictures of rows without <image> (text-only)
        self._rows: list[tuple[int, int]] = []  # Parquet: sample -> (row group, index in it)
        self._group_cache: tuple[int, list] | None = None
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset {self.path} does not exist")
        if self.is_parquet:
            self._read_parquet()
        else:
            self._read_jsonl()
        if not self.samples:
            raise ValueError(f"{self.path}: no usable records ({self.summary()})")
        if self.skipped or self.unused_images:
            warnings.warn(self.summary(), stacklevel=2)

    # -- loading -------------------------------------------------------------------------------------
    def _read_jsonl(self) -> None:
        checked: set[Path] = set()
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    try:
                        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        raise BadRecord(self.path, lineno, "not UTF-8",
                                        f"bytes {raw[e.start:e.end]!r} at byte {e.start} of the line are not "
                                        f"UTF-8 ({e.reason}); expected UTF-8 text") from None
                    if not line.strip():
                        continue
                    messages, images, extra = parse_record(line, self.path, lineno, self.image_root)
                    for p in images:      # decode each picture once up front: fail now, not mid-epoch
                        if self.check_images and p not in checked:
                            check_image_file(p, self.path, lineno)
                            checked.add(p)
                except BadRecord as e:
                    self._skip(e)
                    continue
                self._add(Sample(lineno, messages, images, extra))

    def _read_parquet(self) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{self.path}: reading a .parquet dataset needs pyarrow "
                              "(pip install 'minimind-v[parquet]' or pip install pyarrow)") from None
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:
            raise ValueError(f"{self.path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        columns = pf.schema_arrow.names
        if PARQUET_CONVERSATIONS not in columns:
            raise ValueError(f"{self.path}: no column '{PARQUET_CONVERSATIONS}' (columns: {columns}); expected "
                             f"'{PARQUET_CONVERSATIONS}' (JSON string of turns) and '{PARQUET_IMAGES}' (picture bytes)")
        row = 0
        for g in range(pf.num_row_groups):
            for j, rec in enumerate(pf.read_row_group(g).to_pylist()):
                try:
                    messages, images, extra = self._parse_row(rec, row)
                except BadRecord as e:
                    self._skip(e)
                else:
                    self._add(Sample(row, messages, images, extra))
                    self._rows.append((g, j))
                row += 1

    def _parse_row(self, rec: dict, row: int) -> tuple[list[dict], list[Path], dict]:
        """One Parquet row (a dict of its columns) -> (messages, image names, extra), checked as JSONL records are."""
        def bad(reason, detail):
            return BadRecord(self.path, row, reason, detail, row=True)

        turns = rec[PARQUET_CONVERSATIONS]
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError as e:
                raise bad("malformed JSON", f"'{PARQUET_CONVERSATIONS}' is malformed JSON ({e})") from None
        elif turns is None:
            raise bad("missing key", f"'{PARQUET_CONVERSATIONS}' is null; expected the turns")
        messages = check_turns(turns, bad)
        blobs = rec.get(PARQUET_IMAGES)
        blobs = [] if blobs is None else blobs if isinstance(blobs, list) else [blobs]
        if not all(isinstance(b, bytes) and b for b in blobs):
            raise bad("bad images", f"'{PARQUET_IMAGES}' must hold the bytes of a picture file or a list of them")
        n_placeholders = count_placeholders(messages)
        if n_placeholders == 0 and blobs:          # upstream's text-only rows carry a placeholder picture
            self.unused_images += len(blobs)
            blobs = []
        if len(blobs) != n_placeholders:
            raise bad("image count mismatch", f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) but {len(blobs)} "
                                              f"image(s) in '{PARQUET_IMAGES}'; expected one {IMAGE_TOKEN} per image")
        names = [Path(f"{self.path}#row{row}/{k}") for k in range(len(blobs))]
        if self.check_images:
            for name, data in zip(names, blobs):
                load_image(name, self.path, row, data=data, row=True)
        extra = {k: v for k, v in rec.items() if k not in (PARQUET_CONVERSATIONS, PARQUET_IMAGES)}
        return messages, names, extra

    def _skip(self, e: BadRecord) -> None:
        if not self.skip_bad:
            raise e
        self.skipped[e.reason] += 1
        self.bad_lines.append(str(e))

    def _add(self, sample: Sample) -> None:
        """Keep a parsed record unless max_length cuts away every reply token (then skip and say so)."""
        ids, target = self.tokenizer.encode_conversation(sample.messages, self.num_patches)
        first = target.index(True)                 # the first reply token (check_turns: there is one)
        ids, target, n_images = truncate(ids, target, self.max_length, self.tokenizer.image_pad_id,
                                         self.num_patches)
        if not any(target):
            where = f"row {sample.lineno}" if self.is_parquet else str(sample.lineno)
            sep = ": " if self.is_parquet else ":"
            self.skipped["reply cut away by max_length"] += 1
            self.bad_lines.append(f"{self.path}{sep}{where}: the first reply token is at position {first}, past "
                                  f"max_length={self.max_length}; expected a reply that starts within max_length")
            return
        if self.encoded is not None:            # as tensors: an item then costs no conversion (read-only)
            labels = [t if learn else IGNORE for t, learn in zip(ids, target)]
            self.encoded[len(self.samples)] = (torch.tensor(ids, dtype=torch.long),
                                               torch.tensor(labels, dtype=torch.long), n_images)
        self.samples.append(sample)

    def summary(self) -> str:
        total = len(self.samples) + sum(self.skipped.values())
        text = f"{self.path}: kept {len(self.samples)} of {total} records"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            shown = self.bad_lines[:SHOWN_SKIPS]
            text += f"; the first {len(shown)}: " + " | ".join(shown)
        if self.unused_images:
            text += (f"; {self.unused_images} picture(s) of rows without {IMAGE_TOKEN} left unused "
                     "(upstream MiniMind-V's placeholder for text-only rows)")
        return text

    # -- items -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def _image_bytes(self, i: int) -> list[bytes]:
        """The picture bytes of Parquet sample i (its row group is read once and kept for the next)."""
        g, j = self._rows[i]
        if self._group_cache is None or self._group_cache[0] != g:
            import pyarrow.parquet as pq
            column = pq.ParquetFile(self.path).read_row_group(g, columns=[PARQUET_IMAGES]).column(0)
            self._group_cache = (g, column.to_pylist())
        blobs = self._group_cache[1][j]
        return blobs if isinstance(blobs, list) else [blobs]

    def __getitem__(self, i: int) -> dict:
        lineno, messages, images, _ = self.samples[i]
        if self.encoded is not None and i in self.encoded:
            ids, labels, n_images = self.encoded[i]                     # (T,) tensors, shared: not to be modified
        else:
            ids, labels, n_images = encode_sample(self.tokenizer, messages, self.max_length, self.num_patches)
            ids, labels = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
        images = images[:n_images]
        item = {"input_ids": ids,                                       # (T,)
                "labels": labels,                                       # (T,)
                "image_paths": [str(p) for p in images]}
        if self.load_pixels:
            S = self.image_size
            blobs = self._image_bytes(i)[:n_images] if self.is_parquet and images else [None] * len(images)
            try:
                pixels = [read_pixels(p, S, data=data, alpha=self.alpha, transform=self.transform)
                          for p, data in zip(images, blobs)]
            except BadImage as e:
                reason = "image missing" if e.problem == "not found" else "image unreadable"
                raise BadRecord(self.path, lineno, reason, str(e), self.is_parquet) from None
            item["pixel_values"] = torch.stack(pixels) if pixels else torch.zeros(0, 3, S, S)   # (N, 3, S, S)
        return item


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Items -> a right-padded batch.

    input_ids (B, T) padded with `pad_id`; labels (B, T) padded with -100; attention_mask (B, T)
    True on real tokens; pixel_values (B, Nmax, 3, S, S) zero-padded (None when the items carry
    no pixels, see `load_pixels`); image_counts (B,); image_paths: B lists.
    """
    B = len(batch)
    # one padded copy each (pad_sequence), not B slice assignments
    input_ids = pad_sequence([x["input_ids"] for x in batch], batch_first=True, padding_value=pad_id)  # (B, T)
    labels = pad_sequence([x["labels"] for x in batch], batch_first=True, padding_value=IGNORE)        # (B, T)
    lengths = torch.tensor([len(x["input_ids"]) for x in batch])                                        # (B,)
    attention_mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]                       # (B, T)
    counts = [len(x["image_paths"]) for x in batch]
    pixel_values = None
    if all("pixel_values" in x for x in batch):
        S = batch[0]["pixel_values"].shape[-1]
        pixel_values = torch.zeros(B, max(counts), 3, S, S)
        for b, x in enumerate(batch):
            pixel_values[b, :counts[b]] = x["pixel_values"]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": pixel_values, "image_counts": torch.tensor(counts, dtype=torch.long),
            "image_paths": [x["image_paths"] for x in batch]}
