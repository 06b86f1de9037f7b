"""Someone else's VQA set through the command line alone: easy-VQA.

easy-VQA (Victor Zhou, MIT licence; on PyPI as `easy-vqa`) is a small synthetic set made outside
this project: 64 px pictures of one circle, rectangle or triangle in one of 8 colours, free position
and size, on a pale tinted background, and 13 answers: yes/no (74% of the questions), a colour, or a
shape. 4000 training pictures with 38575 questions, 1000 held-out pictures with 9673 questions.

This script converts it to the conversation JSONL that `minimind-v train` reads, as a user would,
and prints the commands that train and score on it (the README's "Training on your own data"):

    pip install easy-vqa                       # the data ships inside the package (3 MB)
    python benchmarks/easy_vqa.py --out EV     # or --src DIR: a folder holding train/ and test/
    # then the printed commands

Each question becomes one record: the question, then `<image>`; the answer; the picture, renamed
`train_<id>.png` / `test_<id>.png` into one folder; and a question type for the per-type scores,
read off the answer ("yesno") or the question ("colour" when it asks for a color, else "shape").
Nothing is dropped: a malformed entry or a missing picture stops the conversion with its file and
index. The figures are in `benchmarks/tuning.md` and the README.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


class ConvertError(ValueError):
    pass


def find_source() -> Path:
    """The data folder of an installed `easy_vqa` package (its `data/` beside the module)."""
    try:
        import easy_vqa
    except ImportError as e:
        raise ConvertError("easy-VQA not found: `pip install easy-vqa`, or give --src DIR "
                           "(a folder holding train/questions.json and train/images/)") from e
    return Path(easy_vqa.__file__).parent / "data"


def qtype_of(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yesno"
    return "colour" if "color" in question else "shape"


def convert(src: Path, out: Path) -> dict[str, int]:
    """Write out/sft_train.jsonl, out/sft_test.jsonl and out/images/; returns records per split."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        qfile = src / split / "questions.json"
        try:
            questions = json.loads(qfile.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConvertError(f"{qfile}: cannot read it as JSON ({e})") from e
        if not isinstance(questions, list):
            raise ConvertError(f"{qfile}: expected a list of [question, answer, image_id]")
        copied: set[int] = set()
        with open(out / f"sft_{split}.jsonl", "w", encoding="utf-8") as f:
            for i, entry in enumerate(questions):
                if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                        and isinstance(entry[1], str) and isinstance(entry[2], int)):
                    raise ConvertError(f"{qfile}: entry {i} is {entry!r}, expected "
                                       "[question (str), answer (str), image_id (int)]")
                question, answer, image_id = entry
                name = f"{split}_{image_id}.png"
                if image_id not in copied:
                    picture = src / split / "images" / f"{image_id}.png"
                    if not picture.is_file():
                        raise ConvertError(f"{qfile}: entry {i} names image {image_id}, "
                                           f"but {picture} does not exist")
                    shutil.copyfile(picture, out / "images" / name)
                    copied.add(image_id)
                record = {"conversations": [{"role": "user", "content": question + "<image>"},
                                            {"role": "assistant", "content": answer}],
                          "image": name, "qtype": qtype_of(question, answer)}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[split] = len(questions)
    return counts


COMMANDS = """\
minimind-v tokenizer train {o}/sft_train.jsonl --out {o}/tok --vocab-size 1000
minimind-v model-config --tokenizer {o}/tok.model --image-size 64 --out {o}/cfg.json
minimind-v train --stage sft --recipe from-scratch-small --model-config {o}/cfg.json \\
    --data {o}/sft_train.jsonl --images {o}/images --tokenizer {o}/tok.model --out {o}/run \\
    --eval-data {o}/sft_test.jsonl"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, help="easy-VQA's data folder (default: the installed package's)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        counts = convert(a.src or find_source(), a.out)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} training and {counts['test']} held-out records -> {a.out}")
    print("train and score it with:\n" + COMMANDS.format(o=a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
