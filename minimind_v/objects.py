"""A third generated dataset, held out from tuning: six coloured objects and relational questions.

Where it sits: before `data.py`, beside `synthetic.py` and `scenes.py`, in the same JSONL +
image-folder format. The training recipe is tuned on `scenes.py` (and the demo on `synthetic.py`);
this generator is used only to check that the recipe carries over to data it was not fitted to.
Its pictures follow the idea of the public Sort-of-CLEVR benchmark:

- a picture is `image_size` px (75 by default) on a plain grey background (a random light or mid
  level), holding `n_objects` (6) objects at free random positions, none overlapping; each has its
  own colour of six and is a circle, a square or a triangle, of slightly varied size;
- questions (English, several phrasings each, records carry a "qtype"), about one object named
  by its colour; the first three are non-relational, the rest relate it to the others:
    shape     "What shape is the red object?"                          -> circle / square / triangle
    leftside  "Is the red object on the left side of the picture?"     -> yes / no  (centre vs half width)
    top       "Is the blue object in the top half?"                    -> yes / no
    closest   "What shape is the object closest to the green one?"     -> a shape
    furthest  "What shape is the object furthest from the green one?"  -> a shape
    count     "How many objects have the same shape as the orange one?" (itself included) -> "1".."6"
    colourof  "What colour is the circle nearest the top?"            -> a colour
  the qtype is drawn uniformly from those that can be asked unambiguously: an object within 2 px
  of the midline is not asked about (leftside, top), nor one whose two nearest (or furthest)
  others are within 2 px in distance (closest, furthest), nor a shape whose two highest copies
  are within 2 px in height (colourof);
- captions for a pretraining stage: "a red circle at the top left, a blue square near the
  centre, ..." (objects in reading order, positions by thirds of the picture).

An object's position is the centre of its bounding box, integer pixels, so it can be read back
from the picture. Determinism and atomic writing are as in `synthetic.py`: each picture from its
own random stream seeded by (seed, split, index); the folder is built beside its destination
and renamed. The command line: `minimind-v data objects --out DIR [--train N] [--test N] ...`.

    out_dir/images/train_000000.png ... test_000000.png ...
    out_dir/pretrain_train.jsonl  pretrain_test.jsonl  sft_train.jsonl  sft_test.jsonl  meta.json
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .atomic_dir import write_dataset

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 80, 220),
           "orange": (245, 145, 20), "purple": (140, 60, 190), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ["1", "2", "3", "4", "5", "6"]
QTYPES = ("shape", "leftside", "top", "closest", "furthest", "count", "colourof")
MARGIN = 2          # px: how far from a tie (or a midline) a question must stay


@dataclass
class Thing:
    colour: str
    shape: str
    x: int          # centre of the bounding box, px
    y: int
    half: int       # half the side of the bounding box, px


def random_objects(rng: random.Random, image_size: int, n_objects: int) -> list[Thing]:
    """`n_objects` objects of distinct colours whose bounding boxes keep 2 px apart."""
    base = image_size / 15
    lo, hi = max(3, round(base * 0.8)), max(3, round(base * 1.2))
    while True:                                         # restart the rare arrangement that does not fit
        things: list[Thing] = []
        for colour in rng.sample(list(COLOURS), n_objects):
            half = rng.randint(lo, hi)
            for _ in range(200):
                x, y = (rng.randint(half + 1, image_size - 2 - half) for _ in range(2))
                if all(max(abs(x - t.x), abs(y - t.y)) > half + t.half + 2 for t in things):
                    things.append(Thing(colour, rng.choice(SHAPES), x, y, half))
                    break
            else:
                break
        if len(things) == n_objects:
            return things


def draw_objects(things: list[Thing], image_size: int, level: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), (level,) * 3)
    draw = ImageDraw.Draw(image)
    for t in things:
        box = (t.x - t.half, t.y - t.half, t.x + t.half, t.y + t.half)
        rgb = COLOURS[t.colour]
        if t.shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif t.shape == "square":
            draw.rectangle(box, fill=rgb)
        else:                                           # apex up, base along the bottom of the box
            draw.polygon([(t.x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=rgb)
    return image


def distance(a: Thing, b: Thing) -> float:
    return math.hypot(a.x - b.x, a.y - b.y)


def questions(things: list[Thing], image_size: int, rng: random.Random) -> dict[str, tuple[str, str]]:
    """Each askable question type -> one (question, answer) about a randomly chosen object."""
    half = image_size / 2
    out: dict[str, tuple[str, str]] = {}
    t = rng.choice(things)
    out["shape"] = (rng.choice([f"What shape is the {t.colour} object?", f"What is the shape of the {t.colour} one?",
                                f"Which shape does the {t.colour} object have?"]), t.shape)
    t = rng.choice(things)
    out["count"] = (rng.choice([f"How many objects have the same shape as the {t.colour} one?",
                                f"How many objects share the shape of the {t.colour} object?",
                                f"Counting the {t.colour} object itself, how many objects have its shape?"]),
                    NUMBERS[sum(u.shape == t.shape for u in things) - 1])
    for qtype, pos, phrasings in (
            ("leftside", lambda u: u.x, ["Is the {} object on the left side of the picture?",
                                         "Is the {} object in the left half?", "Is the {} one on the left?"]),
            ("top", lambda u: u.y, ["Is the {} object in the top half?", "Is the {} object in the upper half?",
                                    "Is the {} one in the top half of the picture?"])):
        clear = [u for u in things if abs(pos(u) - half) >= MARGIN]
        if clear:
            t = rng.choice(clear)
            out[qtype] = (rng.choice(phrasings).format(t.colour), "yes" if pos(t) < half else "no")
    for qtype, far, phrasings in (
            ("closest", False, ["What shape is the object closest to the {} one?",
                                "What shape is the object nearest to the {} object?",
                                "Which shape is closest to the {} object?"]),
            ("furthest", True, ["What shape is the object furthest from the {} one?",
                                "What shape is the object farthest from the {} object?",
                                "Which shape is furthest from the {} object?"])):
        ok = []
        for t in things:                                # the others by distance, the one asked for first
            d = sorted(((distance(t, u), u) for u in things if u is not t), key=lambda p: p[0], reverse=far)
            if len(d) == 1 or abs(d[0][0] - d[1][0]) >= MARGIN:
                ok.append((t, d[0][1]))
        if ok:
            t, other = rng.choice(ok)
            out[qtype] = (rng.choice(phrasings).format(t.colour), other.shape)
    shape = rng.choice(sorted({t.shape for t in things}))
    ys = sorted((u.y, u.colour) for u in things if u.shape == shape)
    if len(ys) == 1 or ys[1][0] - ys[0][0] >= MARGIN:
        out["colourof"] = (rng.choice([f"What colour is the {shape} nearest the top?",
                                       f"What colour is the highest {shape}?"]), ys[0][1])
    return out


def place(t: Thing, image_size: int) -> str:
    """Where an object is, by thirds of the picture: 'at the top left', 'near the centre', ..."""
    row, col = t.y * 3 // image_size, t.x * 3 // image_size
    v, h = ("top", "middle", "bottom")[row], ("left", "centre", "right")[col]
    if row == 1:
        return "near the centre" if col == 1 else f"on the {h}"
    return f"at the {v}" if col == 1 else f"at the {v} {h}"


def caption(things: list[Thing], image_size: int) -> str:
    order = sorted(things, key=lambda t: (t.y * 3 // image_size, t.x, t.y))
    return ", ".join(f"{'an' if t.colour[0] in 'aeiou' else 'a'} {t.colour} {t.shape} {place(t, image_size)}"
                     for t in order) + "."


def record(question: str, answer: str, image: str, **extra) -> dict:
    return {"conversations": [{"role": "user", "content": question},
                              {"role": "assistant", "content": answer}], "image": image, **extra}


def make_sample(seed: int, split: str, index: int, image_size: int, n_objects: int):
    """(image, caption record, question record) of one picture, from its own random stream."""
    rng = random.Random(f"objects/{seed}/{split}/{index}")
    things = random_objects(rng, image_size, n_objects)
    image = draw_objects(things, image_size, level=rng.randint(110, 230))
    name = f"{split}_{index:06d}.png"
    cap = record(rng.choice(["Describe the picture.<image>", "<image>\nWhat objects are in the picture?"]),
                 caption(things, image_size), name)
    pool = questions(things, image_size, rng)
    qtype = rng.choice(sorted(pool))
    q, a = pool[qtype]
    return image, cap, record(f"{q}<image>", a, name, qtype=qtype)


def answer_words() -> list[str]:
    """Every answer word (for `Tokenizer.train(..., user_defined_symbols=...)`)."""
    return NUMBERS + ["yes", "no"] + list(SHAPES) + list(COLOURS)


def make_dataset(out_dir, n_train: int, n_test: int, seed: int = 0, image_size: int = 75, n_objects: int = 6,
                 overwrite: bool = False) -> Path:
    """Write the dataset (layout in the module docstring); `out_dir` is absent or complete."""
    out_dir = Path(out_dir)
    if not 2 <= n_objects <= len(COLOURS):
        raise ValueError(f"n_objects must be 2..{len(COLOURS)} (one colour each), got {n_objects}")
    if not 45 <= image_size <= 512:
        raise ValueError(f"image_size must be 45..512 px (objects of at least 7 px), got {image_size}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"the numbers of pictures must be >= 0, got train {n_train}, test {n_test}")
    meta = {"generator": "objects", "seed": seed, "n_train": n_train, "n_test": n_test,
            "image_size": image_size, "n_objects": n_objects, "image_root": "images",
            "answer_words": answer_words()}

    def sample(split, i):
        image, cap, question = make_sample(seed, split, i, image_size, n_objects)
        return image, [cap], [question]
    return write_dataset(out_dir, {"train": n_train, "test": n_test}, sample, meta, overwrite)


def add_parser(sub) -> None:
    """`minimind-v data objects ...` (registered by `synthetic.cli`)."""
    from .atomic_dir import dataset_options

    s = sub.add_parser("objects", help="write the held-out objects dataset (Sort-of-CLEVR style relations)")
    dataset_options(s, image_size=75)
    s.add_argument("--objects", type=int, default=6, help="objects per picture (2..6)")


def run(args) -> int:
    out = make_dataset(args.out, args.train, args.test, args.seed, args.image_size, args.objects, args.overwrite)
    print(f"wrote {args.train} + {args.test} object pictures with captions and questions to {out}")
    return 0
