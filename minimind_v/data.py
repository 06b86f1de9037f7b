"""Conversation datasets: JSONL records with images -> token ids, loss labels and pixel values.

Where it sits: between the files on disk and the training loop. Each line of a JSONL file is one
record in the seed's (MiniMind-V's) format:

    {"conversations": [{"role": "user", "content": "闹钟的位置对睡眠质量有什么影响？<image>"},
                       {"role": "assistant", "content": "把数字闹钟放在床头柜..."}],
     "image": "train-00000-of-00001_image_0_0.jpg"}

Several images: comma-separated names (or a JSON list), one `<image>` each, in order. Turns may
start with one "system" turn, then alternate user / assistant and end with an assistant reply.

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
`collate` pads a batch on the right (pad id, label -100, zero pictures).

Bad records (malformed JSON, missing keys, a missing or unreadable image, more or fewer `<image>`
than images, empty or out-of-order turns) raise `BadRecord` naming the file and line; with
`skip_bad=True` they are skipped and counted, and `summary()` says how many of each.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from .image import preprocess
from .tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS

IGNORE = -100   # label of every token the loss skips


class BadRecord(ValueError):
    """A record that cannot be used; the message starts with `file:line:`."""

    def __init__(self, path, lineno: int, reason: str, detail: str):
        super().__init__(f"{path}:{lineno}: {detail}")
        self.reason = reason     # a short category for the skip summary


# ---------------------------------------------------------------------- reading and checking
def parse_record(line: str, path, lineno: int, image_root: Path) -> tuple[list[dict], list[Path]]:
    """One JSONL line -> (messages, image paths), or BadRecord saying what is wrong and what was expected."""
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
    turns = rec["conversations"]
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

    n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
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
    return messages, [image_root / n for n in names]


def load_image(path: Path, source, lineno: int) -> Image.Image:
    """Open and fully decode a picture, or BadRecord naming it and the record that uses it."""
    if not path.is_file():
        raise BadRecord(source, lineno, "image missing", f"image {path} not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as e:       # PIL raises many kinds for broken files
        raise BadRecord(source, lineno, "image unreadable",
                        f"image {path} cannot be read ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------- ids and labels
def truncate(ids: list[int], target: list[bool], max_length: int, image_pad_id: int,
             num_patches: int) -> tuple[list[int], list[bool], int]:
    """Cut to `max_length` without splitting an image run -> (ids, target, images kept)."""
    if len(ids) > max_length:
        pads = ids[:max_length].count(image_pad_id)
        cut = max_length - pads % num_patches        # back up over a partial image run
        ids, target = ids[:cut], target[:cut]
    return ids, target, ids.count(image_pad_id) // num_patches


def encode_sample(tokenizer, messages: list[dict], max_length: int,
                  num_patches: int) -> tuple[list[int], list[int], int]:
    """Messages -> (input_ids, labels, images kept): the template as ids, -100 outside the replies."""
    ids, target = tokenizer.encode_conversation(messages, num_patches)
    ids, target, n_images = truncate(ids, target, max_length, tokenizer.image_pad_id, num_patches)
    labels = [t if learn else IGNORE for t, learn in zip(ids, target)]
    return ids, labels, n_images


class VLMDataset(torch.utils.data.Dataset):
    """A JSONL file of image conversations (pretrain captions or SFT Q&A; same format)."""

    def __init__(self, jsonl_path, image_root, tokenizer, max_length: int, num_patches: int = 196,
                 image_size: int = 224, skip_bad: bool = False, check_images: bool = True,
                 load_pixels: bool = True, keep_encoded: bool = False):
        self.path = Path(jsonl_path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_patches = num_patches
        self.image_size = image_size
        self.load_pixels = load_pixels    # False: items carry image_paths only (vision features cached elsewhere)
        # True: keep each sample's token ids after its first encoding, for a small dataset seen for
        # many epochs (the demo's); a large one would hold them all in memory, so it is opt-in
        self.encoded: dict[int, tuple] | None = {} if keep_encoded else None
        self.samples: list[tuple[int, list[dict], list[Path]]] = []    # (line, messages, images)
        self.skipped: Counter = Counter()                              # reason -> records skipped
        self.bad_lines: list[str] = []                                 # their messages
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset {self.path} does not exist")
        checked: set[Path] = set()
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages, images = parse_record(line, self.path, lineno, self.image_root)
                    for p in images:      # decode each picture once up front: fail now, not mid-epoch
                        if check_images and p not in checked:
                            load_image(p, self.path, lineno)
                            checked.add(p)
                except BadRecord as e:
                    if not skip_bad:
                        raise
                    self.skipped[e.reason] += 1
                    self.bad_lines.append(str(e))
                    continue
                self.samples.append((lineno, messages, images))
        if not self.samples:
            raise ValueError(f"{self.path}: no usable records ({self.summary()})")
        if self.skipped:
            warnings.warn(self.summary(), stacklevel=2)

    def summary(self) -> str:
        total = len(self.samples) + sum(self.skipped.values())
        text = f"{self.path}: kept {len(self.samples)} of {total} records"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return text

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        lineno, messages, images = self.samples[i]
        if self.encoded is not None and i in self.encoded:
            ids, labels, n_images = self.encoded[i]
        else:
            ids, labels, n_images = encode_sample(self.tokenizer, messages, self.max_length, self.num_patches)
            if self.encoded is not None:
                self.encoded[i] = (ids, labels, n_images)
        images = images[:n_images]
        item = {"input_ids": torch.tensor(ids, dtype=torch.long),      # (T,)
                "labels": torch.tensor(labels, dtype=torch.long),      # (T,)
                "image_paths": [str(p) for p in images]}
        if self.load_pixels:
            S = self.image_size
            pixels = [preprocess(load_image(p, self.path, lineno), S) for p in images]
            item["pixel_values"] = torch.stack(pixels) if pixels else torch.zeros(0, 3, S, S)   # (N, 3, S, S)
        return item


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Items -> a right-padded batch.

    input_ids (B, T) padded with `pad_id`; labels (B, T) padded with -100; attention_mask (B, T)
    True on real tokens; pixel_values (B, Nmax, 3, S, S) zero-padded (None when the items carry
    no pixels, see `load_pixels`); image_counts (B,); image_paths: B lists.
    """
    B = len(batch)
    T = max(len(x["input_ids"]) for x in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, x in enumerate(batch):
        t = len(x["input_ids"])
        input_ids[b, :t] = x["input_ids"]
        labels[b, :t] = x["labels"]
        attention_mask[b, :t] = True
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
