"""A generated dataset of coloured shapes, in upstream MiniMind-V's JSONL + image-folder format.

Where it sits: before `data.py`. The demo trains a small VLM on it in minutes on a CPU, so it
has to be learnable, unambiguous and checkable:

- a picture is a 3x3 grid of cells (48 px with 16 px patches: one patch per cell) holding one
  to three shapes, each inside its own cell, of several kinds, colours, sizes and offsets, on a
  dark background of random grey;
- the pretrain set captions every picture ("a red circle at the top left, ..."), the SFT set asks
  one question about it (count, colour, kind, position, what is where), in English or Chinese;
- every question has exactly one right short answer, checked by exact match: a colour or a kind
  is asked about only where it is unique in the picture;
- `<image>` comes after the question, as in upstream MiniMind-V's records (with a causal mask the image
  tokens then see the question).

Every picture is drawn from its own random stream seeded by (seed, split, index), so the same
seed gives byte-identical files and a smaller dataset is a prefix of a larger one. The whole
folder is written next to its destination and renamed into place when complete.

Layout written by `make_dataset(out_dir, ...)`:

    out_dir/images/train_000000.png ...  test_000000.png ...
    out_dir/pretrain_train.jsonl  pretrain_test.jsonl   captions
    out_dir/sft_train.jsonl       sft_test.jsonl        questions (with "qtype" and "lang" keys)
    out_dir/meta.json                                   the arguments and the answer words
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .atomic_dir import dataset_options, write_dataset

# English name -> Chinese name (and RGB for colours)
KINDS = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形"}
COLOURS = {"red": ("红色", (220, 40, 40)), "green": ("绿色", (40, 180, 70)), "blue": ("蓝色", (50, 100, 240)),
           "yellow": ("黄色", (240, 210, 40)), "purple": ("紫色", (160, 70, 220)), "white": ("白色", (240, 240, 240))}
# the 3x3 grid, row by row: cell index = 3 * row + column
POSITIONS = [("top left", "左上"), ("top", "正上方"), ("top right", "右上"),
             ("left", "左边"), ("center", "中间"), ("right", "右边"),
             ("bottom left", "左下"), ("bottom", "正下方"), ("bottom right", "右下")]
COUNTS = {1: ("one", "一个"), 2: ("two", "两个"), 3: ("three", "三个")}
SIZE_RANGE = (0.65, 0.9)     # a shape's width, as a fraction of its cell, is drawn from this range
MAX_BACKGROUND = 60          # background grey level is drawn from 0..MAX_BACKGROUND (all colours are brighter)

CAPTION_PROMPTS = {"en": ["Describe the picture.", "What is in this image?", "Give a short description of the image."],
                   "zh": ["描述这张图片。", "图片里有什么？", "提供给定图像的简要描述。"]}


@dataclass
class Shape:
    kind: str      # a key of KINDS
    colour: str    # a key of COLOURS
    cell: int      # 0..8, row-major in the 3x3 grid
    cx: float      # centre and half-size in pixels
    cy: float
    half: float


def random_scene(rng: random.Random, image_size: int) -> list[Shape]:
    """One to three shapes in distinct cells, sorted in reading order."""
    cell_size = image_size / 3
    shapes = []
    for cell in sorted(rng.sample(range(9), rng.randint(1, 3))):
        row, col = divmod(cell, 3)
        half = cell_size / 2 * rng.uniform(*SIZE_RANGE)
        room = max(cell_size / 2 - half - 1, 0.0)  # how far the centre may move and stay in the cell
        cx = (col + 0.5) * cell_size + rng.uniform(-room, room)
        cy = (row + 0.5) * cell_size + rng.uniform(-room, room)
        shapes.append(Shape(rng.choice(list(KINDS)), rng.choice(list(COLOURS)), cell, cx, cy, half))
    return shapes


def draw_scene(shapes: list[Shape], image_size: int, background: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        rgb = COLOURS[s.colour][1]
        left, top, right, bottom = s.cx - s.half, s.cy - s.half, s.cx + s.half, s.cy + s.half
        if s.kind == "circle":
            draw.ellipse([left, top, right, bottom], fill=rgb)
        elif s.kind == "square":
            draw.rectangle([left, top, right, bottom], fill=rgb)
        elif s.kind == "triangle":    # apex up, widest at the bottom
            draw.polygon([(s.cx, top), (right, bottom), (left, bottom)], fill=rgb)
        else:                         # diamond: widest in the middle
            draw.polygon([(s.cx, top), (right, s.cy), (s.cx, bottom), (left, s.cy)], fill=rgb)
    return image


# ---------------------------------------------------------------------- text
def caption(shapes: list[Shape], lang: str) -> str:
    if lang == "en":
        return ", ".join(f"a {s.colour} {s.kind} at the {POSITIONS[s.cell][0]}" for s in shapes) + "."
    return "，".join(f"{POSITIONS[s.cell][1]}有一个{COLOURS[s.colour][0]}{KINDS[s.kind]}" for s in shapes) + "。"


def questions(shapes: list[Shape]) -> dict[str, list[tuple[str, str, str, str]]]:
    """Every unambiguous question about the scene: qtype -> [(question_en, answer_en, question_zh, answer_zh)]."""
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    n = len(shapes)
    out = {"count": [("How many shapes are there?", COUNTS[n][0], "图片里有几个图形？", COUNTS[n][1])],
           "colour": [], "kind": [], "position": [], "what": []}
    for s in shapes:
        pos_en, pos_zh = POSITIONS[s.cell]
        col_zh, kind_zh = COLOURS[s.colour][0], KINDS[s.kind]
        if kinds.count(s.kind) == 1:
            out["colour"].append((f"What colour is the {s.kind}?", s.colour, f"{kind_zh}是什么颜色？", col_zh))
            out["position"].append((f"Where is the {s.kind}?", pos_en, f"{kind_zh}在哪里？", pos_zh))
        if colours.count(s.colour) == 1:
            out["kind"].append((f"What shape is the {s.colour} one?", s.kind, f"{col_zh}的图形是什么形状？", kind_zh))
            out["position"].append((f"Where is the {s.colour} shape?", pos_en, f"{col_zh}的图形在哪里？", pos_zh))
        out["what"].append((f"What is at the {pos_en}?", f"{s.colour} {s.kind}", f"{pos_zh}是什么？", col_zh + kind_zh))
    return {k: v for k, v in out.items() if v}


def answer_words() -> list[str]:
    """Every word an answer can contain, English and Chinese.

    Pass them to `Tokenizer.train(..., user_defined_symbols=answer_words())` so that each one is a
    single whole piece: the model then answers with one token per word instead of spelling.
    English words come twice, bare and with sentencepiece's space mark '▁' in front.
    """
    english = [w for p in POSITIONS for w in p[0].split()] + [c[0] for c in COUNTS.values()]
    english += list(KINDS) + list(COLOURS)
    chinese = [p[1] for p in POSITIONS] + [c[1] for c in COUNTS.values()]
    chinese += list(KINDS.values()) + [c[0] for c in COLOURS.values()]
    # an English word after a space is its own piece too ("top left" -> "top" "▁left", not "top" "▁" "left")
    return list(dict.fromkeys(english + ["\u2581" + w for w in english] + chinese))


def record(question: str, answer: str, image: str, **extra) -> dict:
    return {"conversations": [{"role": "user", "content": question},
                              {"role": "assistant", "content": answer}], "image": image, **extra}


def make_sample(seed: int, split: str, index: int, image_size: int, questions_per_image: int = 1):
    """(image, caption records, question records) of one picture, from its own random stream."""
    rng = random.Random(f"{seed}/{split}/{index}")
    shapes = random_scene(rng, image_size)
    image = draw_scene(shapes, image_size, background=rng.randint(0, MAX_BACKGROUND))
    name = f"{split}_{index:06d}.png"
    lang = rng.choice(["en", "zh"])
    prompt = rng.choice(CAPTION_PROMPTS[lang])
    captions = [record(f"{prompt}\n<image>", caption(shapes, lang), name)]
    pool = questions(shapes)
    asked = []
    for _ in range(questions_per_image):
        qtype = rng.choice(sorted(pool))
        q_en, a_en, q_zh, a_zh = rng.choice(pool[qtype])
        lang = rng.choice(["en", "zh"])
        q, a = (q_en, a_en) if lang == "en" else (q_zh, a_zh)
        asked.append(record(f"{q}<image>", a, name, qtype=qtype, lang=lang))
    return image, captions, asked


# ---------------------------------------------------------------------- writing
def make_dataset(out_dir, n_train: int, n_test: int, seed: int = 0, image_size: int = 48,
                 questions_per_image: int = 1, overwrite: bool = False) -> Path:
    """Write the dataset to `out_dir` (see the module docstring for the layout); returns the path.

    Built in a temporary sibling folder and renamed into place, so `out_dir` is either absent or
    complete. An existing `out_dir` is replaced only with `overwrite=True`.
    """
    out_dir = Path(out_dir)
    if image_size % 3 != 0 or image_size < 12:
        raise ValueError(f"image_size must be a multiple of 3 and at least 12, got {image_size}")
    meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size,
            "questions_per_image": questions_per_image, "image_root": "images",
            "answer_words": answer_words()}
    return write_dataset(out_dir, {"train": n_train, "test": n_test},
                         lambda split, i: make_sample(seed, split, i, image_size, questions_per_image),
                         meta, overwrite)


def cli(argv: list[str]) -> int:
    """`minimind-v data synth|scenes|objects --out DIR [--train N] [--test N] [--seed S] [--image-size PX]`"""
    parser = argparse.ArgumentParser(prog="minimind-v data", description="generated datasets")
    sub = parser.add_subparsers(dest="action", required=True)
    s = sub.add_parser("synth", help="write the shapes dataset (images + pretrain/SFT JSONL, train/test)")
    dataset_options(s, image_size=48, size_help="pixels (a multiple of 3)")
    s.add_argument("--questions-per-image", type=int, default=1)
    from . import objects, scenes
    scenes.add_parser(sub)
    objects.add_parser(sub)
    args = parser.parse_args(argv)
    if args.action == "scenes":
        return scenes.run(args)
    if args.action == "objects":
        return objects.run(args)
    out = make_dataset(args.out, args.train, args.test, args.seed, args.image_size,
                       args.questions_per_image, args.overwrite)
    print(f"wrote {args.train} + {args.test} pictures with captions and questions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
