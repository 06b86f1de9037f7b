"""Talking to a trained checkpoint, and scoring it: `minimind-v chat` and `minimind-v eval`.

Where it sits: after training. A checkpoint directory written by `train.py` (see `rundir.py`) holds the model's
config (`config.json`), its weights (`model.pt`, or the latest `checkpoint.pt`) and its
tokenizer (`tokenizer.model`), so it can be loaded on its own.

A question becomes ids exactly as in training (`Tokenizer.encode_conversation`, ChatML with the
generation prompt `<|im_start|>assistant\\n`); each `<image>` in it becomes a run of
`num_patches` image-pad ids that the model replaces by the picture's patch vectors at prefill.
Without an explicit `<image>` the picture goes after the question, as in the training records.
Then `generate.stream` yields one id at a time until `<|im_end|>`.

`evaluate` is exact match on a held-out JSONL split: greedy decoding of the reply to every
record's conversation (up to its last user turn), compared with the reference reply as a string.
Prompts of equal length are decoded together in one batch (no padding needed).
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

from .generate import generate, stream
from .image import preprocess
from .rundir import load_chat_model  # noqa: F401 (chat's loader; re-exported for callers)
from .tokenizer import IMAGE_TOKEN, Tokenizer


def image_size(model) -> int:
    return model.cfg.vision.image_size


def num_patches(model) -> int:
    return getattr(model.cfg, "num_patches", 0)


def load_pixels(paths, size: int) -> torch.Tensor:
    """Image files -> (N, 3, size, size), preprocessed as in training."""
    from PIL import Image

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} not found")
        with Image.open(p) as im:
            out.append(preprocess(im, size))
    return torch.stack(out)


def prompt_ids(tok: Tokenizer, messages: list[dict], n_patches: int) -> list[int]:
    """Conversation so far -> ids ending in the generation prompt `<|im_start|>assistant\\n`."""
    ids, _ = tok.encode_conversation(messages, n_patches, add_generation_prompt=True)
    return ids


def user_message(question: str, n_images: int) -> dict:
    """The user's turn; pictures without an explicit `<image>` go after the question."""
    missing = n_images - question.count(IMAGE_TOKEN)
    if missing < 0:
        raise ValueError(f"the prompt has {question.count(IMAGE_TOKEN)} <image> marks but {n_images} image(s)")
    return {"role": "user", "content": question + IMAGE_TOKEN * missing}


def stream_reply(model, tok: Tokenizer, messages: list[dict], pixels: torch.Tensor | None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None):
    """Yield the reply's text piece by piece (decoded so far minus what was already yielded)."""
    ids = torch.tensor([prompt_ids(tok, messages, num_patches(model))])              # (1, T)
    images = pixels[None] if pixels is not None else None                             # (1, N, 3, S, S)
    new, shown = [], ""
    for nxt in stream(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                      eos_id=tok.eos_id, images=images, seed=seed):
        if int(nxt[0]) == tok.eos_id:
            break
        new.append(int(nxt[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):             # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text
    if len(tok.decode(new)) > len(shown):
        yield tok.decode(new)[len(shown):]


def reply(model, tok, messages, pixels, max_new_tokens: int = 64) -> str:
    """The greedy reply as one string."""
    return "".join(stream_reply(model, tok, messages, pixels, max_new_tokens))


# ----------------------------------------------------------------------------- evaluation
IMAGE_MODES = ("real", "blank", "shuffled", "none")


def picture_derangement(shown: list[list], seed: int = 0) -> list[list]:
    """Each record's pictures -> another record's pictures, never its own.

    Records are grouped by how many pictures they have (a record with two `<image>` needs two);
    within a group the *distinct* picture lists are moved along one random cycle (Sattolo's
    algorithm: a uniformly random cyclic permutation, which has no fixed point), so even records
    that share a picture all get a different one. A group with a single distinct picture list
    cannot be deranged and keeps it.
    """
    rng = random.Random(seed)
    out = [list(s) for s in shown]
    groups = defaultdict(list)                       # picture count -> distinct picture lists, first-seen order
    for s in shown:
        key = tuple(str(p) for p in s)
        if s and key not in groups[len(s)]:
            groups[len(s)].append(key)
    moved = {}
    for keys in groups.values():
        cycle = list(range(len(keys)))
        for i in range(len(cycle) - 1, 0, -1):       # Sattolo: j < i (Fisher-Yates would allow j == i)
            j = rng.randrange(i)
            cycle[i], cycle[j] = cycle[j], cycle[i]
        for i, key in enumerate(keys):
            moved[key] = keys[cycle[i]]
    by_str = {tuple(str(p) for p in s): s for s in shown}
    for k, s in enumerate(shown):
        key = tuple(str(p) for p in s)
        if s:
            out[k] = list(by_str[moved[key]])
    return out


def grey_pixels(size: int) -> torch.Tensor:
    """The blank control: a constant mid-grey picture (128, 128, 128), preprocessed. (3, size, size)"""
    from PIL import Image
    return preprocess(Image.new("RGB", (size, size), (128, 128, 128)), size)


@torch.no_grad()
def evaluate(model, tok: Tokenizer, jsonl, image_root, limit: int | None = None, batch_size: int = 64,
             max_new_tokens: int = 16, device="cpu", images: str = "real", seed: int = 0) -> dict:
    """Exact-match accuracy of greedy replies on a JSONL split.

    images: "real" (the records' pictures), or a control that shows what the score owes to them:
    "blank" (every picture a constant mid-grey one), "shuffled" (each record gets another
    record's picture: `picture_derangement(..., seed)`), "none" (the question without
    its `<image>` and no picture).
    Returns {"accuracy", "correct", "total", "by_type": {qtype: (correct, total)}, "examples": [...]},
    examples being (image paths shown, question, reference, prediction) for every record.
    """
    import json

    from .data import VLMDataset

    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    ds = VLMDataset(jsonl, image_root, tok, max_length=10 ** 9, num_patches=num_patches(model),
                    image_size=image_size(model), check_images=False)
    lines = Path(jsonl).read_text(encoding="utf-8").splitlines()
    samples = ds.samples[:limit] if limit else ds.samples
    shown = [list(imgs) for _, _, imgs in samples]                # the pictures each record is shown
    if images == "shuffled":
        shown = picture_derangement(shown, seed)
    grey = grey_pixels(image_size(model)) if images == "blank" else None
    groups = defaultdict(list)                       # (prompt length, images) -> records (no padding in a batch)
    for k, (lineno, messages, imgs) in enumerate(samples):
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{jsonl}:{lineno}: the last turn must be the assistant's reference reply")
        prompt = messages[:-1]
        if images == "none":
            prompt = [dict(m, content=m["content"].replace(IMAGE_TOKEN, "")) for m in prompt]
            shown[k] = []
        ids = prompt_ids(tok, prompt, num_patches(model))
        groups[(len(ids), len(shown[k]))].append((k, ids))
    predictions = {}
    for (_, n_img), items in groups.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ids = torch.tensor([it[1] for it in chunk], device=device)                    # (B, T)
            pixels = None
            if n_img and grey is not None:
                pixels = grey.expand(len(chunk), n_img, *grey.shape).to(device)           # (B, N, 3, S, S)
            elif n_img:
                pixels = torch.stack([load_pixels(shown[k], image_size(model)) for k, _ in chunk]).to(device)
            out = generate(model, ids, max_new_tokens, eos_id=tok.eos_id, images=pixels)  # (B, T + n)
            for (k, _), row in zip(chunk, out[:, ids.shape[1]:].tolist()):
                row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
                predictions[k] = tok.decode(row)
    correct, by_type, examples = 0, defaultdict(lambda: [0, 0]), []
    for k, (lineno, messages, _) in enumerate(samples):
        ref, pred = messages[-1]["content"].strip(), predictions[k].strip()
        qtype = json.loads(lines[lineno - 1]).get("qtype", "all")
        hit = pred == ref
        correct += hit
        by_type[qtype][0] += hit
        by_type[qtype][1] += 1
        examples.append(([str(p) for p in shown[k]], messages[-2]["content"], ref, pred))
    total = len(samples)
    return {"accuracy": correct / total, "correct": correct, "total": total,
            "by_type": {k: tuple(v) for k, v in sorted(by_type.items())}, "examples": examples}


# ----------------------------------------------------------------------------- command line
def cli_chat(argv: list[str]) -> int:
    """`minimind-v chat --checkpoint DIR [--image PATH ...] [PROMPT]`"""
    p = argparse.ArgumentParser(prog="minimind-v chat", description="Ask a checkpoint about an image.")
    p.add_argument("--checkpoint", required=True, help="directory written by `minimind-v train` or `demo`")
    p.add_argument("--image", action="append", default=[], help="a picture (repeat for several)")
    p.add_argument("prompt", nargs="?", help="the question; without it, an interactive session")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    a = p.parse_args(argv)
    model, tok, _ = load_chat_model(a.checkpoint)
    pixels = load_pixels(a.image, image_size(model)) if a.image else None
    n_images = len(a.image)

    def answer(messages):
        for piece in stream_reply(model, tok, messages, pixels, a.max_new_tokens, a.temperature, a.top_p, a.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    if a.prompt is not None:
        answer([user_message(a.prompt, n_images)])
        return 0
    print("interactive chat: the picture(s) go with your first question; empty line or Ctrl-D quits")
    history: list[dict] = []
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question:
            break
        history.append(user_message(question, n_images) if not history else {"role": "user", "content": question})
        text = []
        for piece in stream_reply(model, tok, history, pixels, a.max_new_tokens, a.temperature, a.top_p, a.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
            text.append(piece)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(text)})
    return 0


def cli_eval(argv: list[str]) -> int:
    """`minimind-v eval --checkpoint DIR --data JSONL --images DIR` (see `evaluation.cli`)."""
    from .evaluation import cli
    return cli(argv)
