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

import torch

from .generate import generate, stream
from .image import preprocess, read_pixels
from .rundir import load_chat_model  # noqa: F401 (chat's loader; re-exported for callers)
from .tokenizer import IMAGE_TOKEN, Tokenizer


def image_size(model) -> int:
    return model.cfg.vision.image_size


def num_patches(model) -> int:
    return getattr(model.cfg, "num_patches", 0)


def load_pixels(paths, size: int, alpha: str = "white", transform=None) -> torch.Tensor:
    """Image files -> (N, 3, size, size), decoded and preprocessed as in training (errors name the file).

    alpha: "white" composites a transparent picture on white (ours); "drop" ignores the alpha band,
    as upstream's `convert('RGB')` does (config.json's `image_alpha` of an imported checkpoint).
    transform: the encoder's own preprocessing when it is not CLIP's (`image_settings`).
    """
    return torch.stack([read_pixels(p, size, alpha=alpha, transform=transform) for p in paths])


def image_settings(model) -> dict:
    """How `model` wants its pictures: load_pixels' alpha and transform, from the run directory's
    config.json (kept by `rundir.load_chat_model` as `model.run_info`) and the encoder kind."""
    from .vlm import pixel_transform

    info = getattr(model, "run_info", None) or {}
    cfg = getattr(model, "cfg", None)
    transform = pixel_transform(cfg, info.get("image_preprocess")) if hasattr(cfg, "vision_kind") else None
    return {"alpha": info.get("image_alpha", "white"), "transform": transform}


def prompt_ids(tok: Tokenizer, messages: list[dict], n_patches: int) -> list[int]:
    """Conversation so far -> ids ending in the generation prompt `<|im_start|>assistant\\n`."""
    ids, _ = tok.encode_conversation(messages, n_patches, add_generation_prompt=True)
    return ids


def user_message(question: str, n_images: int, position: str = "after") -> dict:
    """The user's turn. Each `<image>` in the question is where a picture's placeholder run goes;
    pictures without one go after the question (our training records), or, with position
    "before", in front of it followed by a newline: upstream MiniMind-V's prompt "<image>\n" + question.
    """
    missing = n_images - question.count(IMAGE_TOKEN)
    if missing < 0:
        raise ValueError(f"the prompt has {question.count(IMAGE_TOKEN)} <image> marks but {n_images} image(s)")
    if position == "before":
        return {"role": "user", "content": (IMAGE_TOKEN + "\n") * missing + question}
    return {"role": "user", "content": question + IMAGE_TOKEN * missing}


def stream_reply(model, tok: Tokenizer, messages: list[dict], pixels: torch.Tensor | None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, compile: bool = False):
    """Yield the reply's text piece by piece (decoded so far minus what was already yielded).
    compile=True: decode through `generate.stream`'s compiled static-cache step (same tokens)."""
    ids = torch.tensor([prompt_ids(tok, messages, num_patches(model))])              # (1, T)
    images = pixels[None] if pixels is not None else None                             # (1, N, 3, S, S)
    new, shown = [], ""
    for nxt in stream(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                      eos_id=tok.eos_id, images=images, seed=seed, compile=compile):
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


class PictureFeatures:
    """The encoder's output per picture file, computed once and kept while it fits in `max_bytes`.

    A VQA split asks several questions about each picture (easy-VQA: ~10), and the controls show
    the same pictures again (shuffled), so `evaluate` decodes and encodes each file once instead of
    once per question. Past the budget, features are computed per batch and not kept.
    """

    def __init__(self, model, max_bytes: int = 512 * 2 ** 20):
        self.model, self.max_bytes, self.kept, self.bytes = model, max_bytes, {}, 0

    def batch(self, shown: list[list]) -> torch.Tensor:
        """Per-record lists of N picture paths -> (B, N, P, Dv) features."""
        new = list(dict.fromkeys(str(p) for paths in shown for p in paths if str(p) not in self.kept))
        fresh = {}
        if new:
            pixels = load_pixels(new, image_size(self.model), **image_settings(self.model))   # (n, 3, S, S)
            device = next(self.model.parameters()).device
            fresh = dict(zip(new, self.model.image_features(pixels.to(device))))          # path -> (P, Dv)
            for path, f in fresh.items():
                if self.bytes + f.numel() * f.element_size() <= self.max_bytes:
                    self.kept[path] = f
                    self.bytes += f.numel() * f.element_size()
        pick = lambda p: self.kept.get(str(p), fresh.get(str(p)))              # noqa: E731
        return torch.stack([torch.stack([pick(p) for p in paths]) for paths in shown])


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
    from .data import VLMDataset

    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    ds = VLMDataset(jsonl, image_root, tok, max_length=10 ** 9, num_patches=num_patches(model),
                    image_size=image_size(model), check_images=False)
    samples = ds.samples[:limit] if limit else ds.samples
    shown = [list(s.images) for s in samples]                # the pictures each record is shown
    if images == "shuffled":
        shown = picture_derangement(shown, seed)
    grey = grey_pixels(image_size(model)) if images == "blank" else None
    groups = defaultdict(list)                       # (prompt length, images) -> records (no padding in a batch)
    for k, (lineno, messages, imgs, _) in enumerate(samples):
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{jsonl}:{lineno}: the last turn must be the assistant's reference reply")
        prompt = messages[:-1]
        if images == "none":
            prompt = [dict(m, content=m["content"].replace(IMAGE_TOKEN, "")) for m in prompt]
            shown[k] = []
        ids = prompt_ids(tok, prompt, num_patches(model))
        groups[(len(ids), len(shown[k]))].append((k, ids))
    predictions = {}
    features = PictureFeatures(model)                     # each picture file decoded and encoded once
    for (_, n_img), items in groups.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ids = torch.tensor([it[1] for it in chunk], device=device)                    # (B, T)
            pixels, feats = None, None
            if n_img and grey is not None:
                pixels = grey.expand(len(chunk), n_img, *grey.shape).to(device)           # (B, N, 3, S, S)
            elif n_img:
                feats = features.batch([shown[k] for k, _ in chunk])                      # (B, N, P, Dv)
            out = generate(model, ids, max_new_tokens, eos_id=tok.eos_id, images=pixels,
                           image_features=feats)                                          # (B, T + n)
            for (k, _), row in zip(chunk, out[:, ids.shape[1]:].tolist()):
                row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
                predictions[k] = tok.decode(row)
    correct, by_type, examples = 0, defaultdict(lambda: [0, 0]), []
    for k, (lineno, messages, images, extra) in enumerate(samples):
        ref, pred = messages[-1]["content"].strip(), predictions[k].strip()
        qtype = extra.get("qtype", "all")
        hit = pred == ref
        correct += hit
        by_type[qtype][0] += hit
        by_type[qtype][1] += 1
        examples.append(([str(p) for p in shown[k]], messages[-2]["content"], ref, pred))
    total = len(samples)
    return {"accuracy": correct / total, "correct": correct, "total": total,
            "by_type": {k: tuple(v) for k, v in sorted(by_type.items())}, "examples": examples}


# ----------------------------------------------------------------------------- command line
def check_sampling(parser, a) -> None:
    """Refuse sampling settings that mean nothing, before the model is loaded."""
    if a.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if getattr(a, "temperature", 0.0) < 0 or getattr(a, "temperature", 0.0) != getattr(a, "temperature", 0.0):
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
    top_p = getattr(a, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {top_p}")


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
    p.add_argument("--compile", action="store_true", help="decode with a compiled step (faster per token; "
                                                          "the first reply compiles, seconds)")
    a = p.parse_args(argv)
    check_sampling(p, a)
    model, tok, info = load_chat_model(a.checkpoint)
    if a.image and not hasattr(model, "vision_encoder"):
        raise ValueError(f"{a.checkpoint}: a text-only language model cannot take --image")
    pixels = load_pixels(a.image, image_size(model), **image_settings(model)) if a.image else None
    n_images, position = len(a.image), info.get("image_position", "after")

    def answer(messages):
        for piece in stream_reply(model, tok, messages, pixels, a.max_new_tokens, a.temperature, a.top_p, a.seed,
                                  a.compile):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    if a.prompt is not None:
        answer([user_message(a.prompt, n_images, position)])
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
        history.append(user_message(question, n_images, position) if not history
                       else {"role": "user", "content": question})
        text = []
        for piece in stream_reply(model, tok, history, pixels, a.max_new_tokens, a.temperature, a.top_p, a.seed,
                                  a.compile):
            sys.stdout.write(piece)
            sys.stdout.flush()
            text.append(piece)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(text)})
    return 0
