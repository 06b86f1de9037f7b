"""Writing a whole folder atomically: build it beside its destination, then rename it into place.

Where it sits: under the dataset generators (`synthetic.py`, `scenes.py`, `objects.py`), whose output folder is
either absent or complete, never half-written (a killed run leaves only a hidden temp folder,
which the next run removes). `checkpoint.atomic_save` does the same for single files.
It also holds the command-line options those generators share (`dataset_options`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(out_dir, overwrite: bool = False):
    """`with atomic_folder(out) as tmp:` write into `tmp`; on success it replaces `out`.

    An existing `out` is replaced only with `overwrite=True`; on an error nothing of `out` changes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dataset(out_dir, splits: dict, sample, meta: dict, overwrite: bool = False) -> Path:
    """The generators' shared layout, written atomically: images/, pretrain_/sft_{split}.jsonl, meta.json.

    `splits` maps a split name to its number of pictures; `sample(split, i)` returns
    (image, caption records, question records) of picture i, whose file name is the first
    caption's "image".
    """
    with atomic_folder(out_dir, overwrite) as tmp:
        (tmp / "images").mkdir()
        for split, n in splits.items():
            with open(tmp / f"pretrain_{split}.jsonl", "w", encoding="utf-8") as fp, \
                 open(tmp / f"sft_{split}.jsonl", "w", encoding="utf-8") as fs:
                for i in range(n):
                    image, captions, asked = sample(split, i)
                    image.save(tmp / "images" / captions[0]["image"], compress_level=1)
                    fp.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in captions)
                    fs.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in asked)
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    return Path(out_dir)


def dataset_options(s, image_size: int, size_help: str = "pixels per side") -> None:
    """The options every `minimind-v data` generator takes (its own follow)."""
    s.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    s.add_argument("--train", type=int, default=4000, help="training pictures")
    s.add_argument("--test", type=int, default=500, help="held-out pictures")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=image_size, help=size_help)
    s.add_argument("--overwrite", action="store_true")
