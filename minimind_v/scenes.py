"""A second generated dataset, unlike the shapes one: glyphs on a grid, relations, counting, yes/no.

Where it sits: before `data.py`, beside `synthetic.py`, in the same JSONL + image-folder format.
The demo's settings were tuned on `synthetic.py`'s pictures; this generator differs in kind, so
a recipe that scores well here was not fitted to the demo's data:

- a picture is `image_size` px (64 by default) on a light background (the shapes are on dark),
  a `grid` x `grid` board (4x4) with two to four glyphs, each in its own cell with a small
  random offset: digits 1-8 (or letters, `glyphs="letters"`) in one of four colours;
- questions (English, several phrasings each, records carry a "qtype"):
    count     "How many characters are there?" / "How many orange characters ...?"  -> "0".."4"
    exists    "Is there a 7?" / "Does the picture contain a 7?"                      -> yes / no
    leftright "Is the 3 left of the 5?" / "... to the right of ..."  (different columns) -> yes / no
    updown    "Is the 3 above the 5?" / "... below ..."              (different rows)    -> yes / no
    colour    "What colour is the 4?"                                                -> a colour
    which     "Which character is teal?"  (only where that colour is unique)          -> a glyph
  yes/no questions are balanced (half of each), so answering from the question alone gets ~50%;
- captions for a pretraining stage: "an orange 3 at row 1, column 2; ..." (reading order).

Determinism and atomic writing are as in `synthetic.py`: each picture from its own random stream
seeded by (seed, split, index); the folder is built beside its destination and renamed.

    out_dir/images/train_000000.png ... test_000000.png ...
    out_dir/pretrain_train.jsonl  pretrain_test.jsonl  sft_train.jsonl  sft_test.jsonl  meta.json
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .atomic_dir import write_dataset

GLYPHS = {"digits": list("12345678"), "letters": list("AEHKMRTX")}
COLOURS = {"orange": (235, 120, 0), "teal": (0, 140, 140), "magenta": (200, 0, 160), "black": (20, 20, 20)}
NUMBERS = ["0", "1", "2", "3", "4"]
QTYPES = ("count", "exists", "leftright", "updown", "colour", "which")


@dataclass
class Glyph:
    char: str
    colour: str
    row: int
    col: int


def random_board(rng: random.Random, glyphs: list[str], grid: int) -> list[Glyph]:
    """Two to four distinct glyphs in distinct cells, in reading order."""
    n = rng.randint(2, 4)
    chars = rng.sample(glyphs, n)
    cells = sorted(rng.sample(range(grid * grid), n))
    return [Glyph(c, rng.choice(list(COLOURS)), cell // grid, cell % grid) for c, cell in zip(chars, cells)]


def draw_board(board: list[Glyph], image_size: int, grid: int, rng: random.Random, background: str) -> Image.Image:
    cell = image_size / grid
    level = rng.randint(205, 255) if background == "light" else rng.randint(0, 50)
    image = Image.new("RGB", (image_size, image_size), (level,) * 3)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, round(cell * 0.85)))
    for g in board:
        rgb = COLOURS[g.colour] if background == "light" or g.colour != "black" else (235, 235, 235)
        left, top, right, bottom = draw.textbbox((0, 0), g.char, font=font)
        room_x = max(cell - (right - left) - 2, 0) / 2          # how far the glyph may move and stay in its cell
        room_y = max(cell - (bottom - top) - 2, 0) / 2
        x = (g.col + 0.5) * cell - (left + right) / 2 + rng.uniform(-room_x, room_x)
        y = (g.row + 0.5) * cell - (top + bottom) / 2 + rng.uniform(-room_y, room_y)
        draw.text((x, y), g.char, font=font, fill=rgb, stroke_width=1, stroke_fill=rgb)
    return image


def colour_name(g: Glyph, background: str) -> str:
    return "white" if background == "dark" and g.colour == "black" else g.colour


def questions(board: list[Glyph], glyphs: list[str], rng: random.Random, background: str) -> dict[str, list]:
    """Every question type's candidates: qtype -> [(question, answer)]; yes/no ones balanced."""
    noun = "digit" if glyphs[0].isdigit() else "letter"
    names = [colour_name(g, background) for g in board]
    out = {q: [] for q in QTYPES}
    out["count"].append((rng.choice([f"How many {noun}s are there?", f"How many {noun}s can you see?"]),
                         NUMBERS[len(board)]))
    colour = rng.choice(sorted(set(names) | {rng.choice(names + ["orange", "teal", "magenta"])}))
    out["count"].append((f"How many {colour} {noun}s are there?", NUMBERS[names.count(colour)]))
    present = [g.char for g in board]
    absent = [c for c in glyphs if c not in present]
    ask = rng.choice(present) if rng.random() < 0.5 else rng.choice(absent)
    out["exists"].append((rng.choice([f"Is there a {ask}?", f"Does the picture contain a {ask}?"]),
                          "yes" if ask in present else "no"))
    pairs = [(a, b) for a in board for b in board if a is not b]
    for qtype, differ, words in (("leftright", lambda a, b: a.col != b.col, ("left of", "to the right of")),
                                 ("updown", lambda a, b: a.row != b.row, ("above", "below"))):
        ok = [(a, b) for a, b in pairs if differ(a, b)]
        if ok:
            a, b = rng.choice(ok)
            word = rng.choice(words)
            first = a.col < b.col if qtype == "leftright" else a.row < b.row     # a left of / above b
            truth = first if word in ("left of", "above") else not first
            out[qtype].append((f"Is the {a.char} {word} the {b.char}?", "yes" if truth else "no"))
    g = rng.choice(board)
    out["colour"].append((rng.choice([f"What colour is the {g.char}?", f"Which colour does the {g.char} have?"]),
                          colour_name(g, background)))
    unique = [g for g, c in zip(board, names) if names.count(c) == 1]
    if unique:
        g = rng.choice(unique)
        out["which"].append((f"Which {noun} is {colour_name(g, background)}?", g.char))
    return {k: v for k, v in out.items() if v}


def caption(board: list[Glyph], background: str) -> str:
    return "; ".join(f"{'an' if colour_name(g, background)[0] in 'aeiou' else 'a'} {colour_name(g, background)} "
                     f"{g.char} at row {g.row + 1}, column {g.col + 1}" for g in board) + "."


def record(question: str, answer: str, image: str, **extra) -> dict:
    return {"conversations": [{"role": "user", "content": question},
                              {"role": "assistant", "content": answer}], "image": image, **extra}


def make_sample(seed: int, split: str, index: int, image_size: int, grid: int, glyphs: str, background: str):
    """(image, caption record, question record) of one picture, from its own random stream."""
    rng = random.Random(f"scenes/{seed}/{split}/{index}")
    chars = GLYPHS[glyphs]
    board = random_board(rng, chars, grid)
    image = draw_board(board, image_size, grid, rng, background)
    name = f"{split}_{index:06d}.png"
    cap = record(rng.choice(["Describe the picture.<image>", "<image>\nWhat is on the board?"]),
                 caption(board, background), name)
    pool = questions(board, chars, rng, background)
    qtype = rng.choice(sorted(pool))
    q, a = rng.choice(pool[qtype])
    return image, cap, record(f"{q}<image>", a, name, qtype=qtype)


def answer_words(glyphs: str = "digits", background: str = "light") -> list[str]:
    """Every answer word (for `Tokenizer.train(..., user_defined_symbols=...)`)."""
    colours = [c for c in COLOURS if background == "light" or c != "black"] + (["white"] if background == "dark" else [])
    return list(dict.fromkeys(NUMBERS + ["yes", "no"] + colours + GLYPHS[glyphs]))


def make_dataset(out_dir, n_train: int, n_test: int, seed: int = 0, image_size: int = 64, grid: int = 4,
                 glyphs: str = "digits", background: str = "light", overwrite: bool = False) -> Path:
    """Write the dataset (layout in the module docstring); `out_dir` is absent or complete."""
    out_dir = Path(out_dir)
    if glyphs not in GLYPHS:
        raise ValueError(f"glyphs must be one of {', '.join(GLYPHS)}, got {glyphs!r}")
    if background not in ("light", "dark"):
        raise ValueError(f"background must be light or dark, got {background!r}")
    if not 2 <= grid <= 8 or image_size < 8 * grid:
        raise ValueError(f"grid must be 2..8 with at least 8 px per cell, got grid {grid} at {image_size} px")
    meta = {"generator": "scenes", "seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size,
            "grid": grid, "glyphs": glyphs, "background": background, "image_root": "images",
            "answer_words": answer_words(glyphs, background)}

    def sample(split, i):
        image, cap, question = make_sample(seed, split, i, image_size, grid, glyphs, background)
        return image, [cap], [question]
    return write_dataset(out_dir, {"train": n_train, "test": n_test}, sample, meta, overwrite)


def add_parser(sub) -> None:
    """`minimind-v data scenes ...` (registered by `synthetic.cli`)."""
    from .atomic_dir import dataset_options

    s = sub.add_parser("scenes", help="write the glyph-board dataset (relations, counting, yes/no)")
    dataset_options(s, image_size=64)
    s.add_argument("--grid", type=int, default=4, help="cells per side")
    s.add_argument("--glyphs", default="digits", choices=tuple(GLYPHS))
    s.add_argument("--background", default="light", choices=("light", "dark"))


def run(args) -> int:
    out = make_dataset(args.out, args.train, args.test, args.seed, args.image_size, args.grid, args.glyphs,
                       args.background, args.overwrite)
    print(f"wrote {args.train} + {args.test} glyph boards with captions and questions to {out}")
    return 0
