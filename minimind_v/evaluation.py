"""Does the model look at the picture? Exact match with vision-reliance controls: `minimind-v eval`.

Where it sits: after training, beside `chat.evaluate` (which scores one way of showing the
pictures). A high exact match can come from the questions alone: "Is there a ...?" is mostly
"no", a colour question has six answers. So the same checkpoint is scored four ways, plus a
baseline that never looks at anything:

    real       the records' own pictures
    blank      every picture replaced by a constant mid-grey one (the same input for every record)
    shuffled   each record shown another record's picture (a fixed seeded derangement)
    none       the question without its image (no image positions at all)
    majority   the most common reference answer per question type (no model)
    question   the most common reference answer to the same question text (no model): what the
               words alone can answer, the best a model that never looks could do

The image gain, real minus blank, is the part of the score that needs the picture; it is
printed first. Blank near the majority baseline means the model answers from the question
alone when it cannot see; shuffled below blank means it reads the (wrong) picture and believes
it. Where the question baseline is high (a set whose "Is there a ...?" is mostly "no"), a model
that reads every picture can gain at most 100% minus it: the last line prints that ceiling beside
real minus question. Everything is given per question type when records carry a "qtype".
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from .chat import picture_derangement  # noqa: F401 (re-exported: the shuffled control's derangement)

CONTROLS = ("real", "blank", "shuffled", "none")


def read_records(jsonl) -> list[tuple[str, str, str]]:
    """(qtype, question, reference answer) of every record ("all" where a record has no qtype); the
    question is every turn before the last, without its `<image>` markers, stripped."""
    rows = []
    for n, line in enumerate(Path(jsonl).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            turns = rec["conversations"]
            question = "\n".join(t["content"].replace("<image>", "").strip() for t in turns[:-1])
            rows.append((rec.get("qtype", "all"), question, turns[-1]["content"].strip()))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(f"{jsonl}:{n}: expected a record with 'conversations' ending in the reference") from None
    return rows


def read_answers(jsonl) -> list[tuple[str, str]]:
    """(qtype, reference answer) of every record ("all" where a record has no qtype)."""
    return [(qtype, ans) for qtype, _, ans in read_records(jsonl)]


def most_common(counts: Counter) -> str:
    """The most frequent answer; a tie goes to the first in sorted order (deterministic)."""
    return min(counts, key=lambda a: (-counts[a], a))


def majority_baseline(scored: list[tuple[str, str]], source: list[tuple[str, str]] | None = None) -> dict:
    """Answer every question with the most common reference of its type in `source` (default: `scored`).

    Ties go to the answer first in sorted order, so the baseline is deterministic. A type absent
    from `source` gets the overall most common answer. Returns the same shape as `chat.evaluate`
    (without examples) plus "answers": qtype -> the answer used.
    """
    source = source if source is not None else scored
    per_type = defaultdict(Counter)
    for qtype, ans in source:
        per_type[qtype][ans] += 1
    overall = Counter(ans for _, ans in source)
    answers = {q: most_common(c) for q, c in per_type.items()}
    by_type = defaultdict(lambda: [0, 0])
    for qtype, ans in scored:
        guess = answers[qtype] if qtype in answers else most_common(overall)      # a type absent from source
        by_type[qtype][0] += guess == ans
        by_type[qtype][1] += 1
    correct = sum(c for c, _ in by_type.values())
    return {"accuracy": correct / max(len(scored), 1), "correct": correct, "total": len(scored),
            "by_type": {k: tuple(v) for k, v in sorted(by_type.items())}, "answers": answers}


def question_baseline(scored: list[tuple[str, str, str]], source: list[tuple[str, str, str]] | None = None) -> dict:
    """Answer every question with the most common reference to the same question text in `source`
    (default: `scored`); a question absent from `source` gets its type's majority answer.

    scored, source: (qtype, question, answer) rows (`read_records`). No picture is ever looked at,
    so this is what the words alone can answer. Ties as in `majority_baseline`; the same shape,
    with "answers": question -> the answer used.
    """
    source = source if source is not None else scored
    per_question = defaultdict(Counter)
    for _, question, ans in source:
        per_question[question][ans] += 1
    answers = {q: most_common(c) for q, c in per_question.items()}
    fallback = majority_baseline([(t, a) for t, _, a in scored], [(t, a) for t, _, a in source])["answers"]
    overall = most_common(Counter(a for _, _, a in source))
    by_type = defaultdict(lambda: [0, 0])
    for qtype, question, ans in scored:
        guess = answers.get(question, fallback.get(qtype, overall))
        by_type[qtype][0] += guess == ans
        by_type[qtype][1] += 1
    correct = sum(c for c, _ in by_type.values())
    return {"accuracy": correct / max(len(scored), 1), "correct": correct, "total": len(scored),
            "by_type": {k: tuple(v) for k, v in sorted(by_type.items())}, "answers": answers}


def controls(model, tok, jsonl, image_root, train_data=None, limit: int | None = None, seed: int = 0,
             max_new_tokens: int = 16, modes=CONTROLS, log=None) -> dict:
    """Score one checkpoint with every control: {"real": res, "blank": ..., "shuffled": ..., "none": ...,
    "majority": ..., "question": ..., "majority_from": "training split" | "scored split",
    "image_gain": real - blank, "shuffled_gain": real - shuffled, "question_gain": real - question}."""
    from .chat import evaluate

    out = {}
    for mode in modes:
        out[mode] = evaluate(model, tok, jsonl, image_root, limit, max_new_tokens=max_new_tokens,
                             images=mode, seed=seed)
        if log:
            log(f"  {mode:8s} {out[mode]['accuracy']:6.1%}")
    scored = read_records(jsonl)
    scored = scored[:limit] if limit else scored
    source = read_records(train_data) if train_data else None
    out["majority"] = majority_baseline([(t, a) for t, _, a in scored],
                                        [(t, a) for t, _, a in source] if source else None)
    out["question"] = question_baseline(scored, source)
    out["majority_from"] = f"training split {train_data}" if train_data else "scored split (no --train-data)"
    if "real" in out and "blank" in out:
        out["image_gain"] = out["real"]["accuracy"] - out["blank"]["accuracy"]
    if "real" in out and "shuffled" in out:
        out["shuffled_gain"] = out["real"]["accuracy"] - out["shuffled"]["accuracy"]
    if "real" in out:
        out["question_gain"] = out["real"]["accuracy"] - out["question"]["accuracy"]
    return out


def table(res: dict) -> list[str]:
    """The controls as a text table, one row per question type; the image gain first."""
    modes = [m for m in CONTROLS if m in res] + ["majority"] + (["question"] if "question" in res else [])
    lines = []
    if "image_gain" in res:
        # a grey picture unlike any training picture can score below chance, which inflates real - blank;
        # real - shuffled (another record's real picture) is the stricter measure, printed beside it
        shuffled = f" (real - shuffled: {100 * res['shuffled_gain']:+.1f})" if "shuffled_gain" in res else ""
        lines.append(f"image gain (real - blank): {100 * res['image_gain']:+.1f} points{shuffled}")
    types = list(res[modes[0]]["by_type"])
    head = f"{'qtype':10s} {'n':>5s} " + " ".join(f"{m:>9s}" for m in modes)
    lines += [head]
    for qtype in types + ["all"]:
        cells, n = [], None
        for m in modes:
            if qtype == "all":
                c, n = res[m]["correct"], res[m]["total"]
            else:
                c, n = res[m]["by_type"].get(qtype, (0, 0))
            cells.append(f"{c / n:9.1%}" if n else f"{'-':>9s}")
        lines.append(f"{qtype:10s} {n:5d} " + " ".join(cells))
    lines.append(f"majority (per type) and question (per question text) baselines from the {res['majority_from']}")
    if "question_gain" in res:
        q = res["question"]["accuracy"]
        lines.append(f"the words alone answer {q:.1%}, so the picture can add at most {100 * (1 - q):.1f} points; "
                     f"real - question: {100 * res['question_gain']:+.1f}")
    return lines


def cli(argv: list[str]) -> int:
    """`minimind-v eval --checkpoint DIR --data JSONL --images DIR [--train-data JSONL]`"""
    from .rundir import load_chat_model

    p = argparse.ArgumentParser(prog="minimind-v eval", description="Exact-match accuracy on a held-out split, "
                                "with blank / shuffled / no-image controls and the majority-answer baseline.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="JSONL conversations; the last turn is the reference reply")
    p.add_argument("--images", required=True, help="folder the records' image names are relative to")
    p.add_argument("--train-data", help="the training split: the majority baseline's answers come from it")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled control's derangement")
    p.add_argument("--no-controls", action="store_true", help="score the real pictures only")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--show", type=int, default=5, help="print this many examples")
    a = p.parse_args(argv)
    for name in ("limit", "threads", "max_new_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    model, tok, _ = load_chat_model(a.checkpoint)
    res = controls(model, tok, a.data, a.images, a.train_data, a.limit, a.seed, a.max_new_tokens,
                   modes=("real",) if a.no_controls else CONTROLS)
    for paths, q, ref, pred in res["real"]["examples"][:a.show]:
        print(f"{', '.join(Path(x).name for x in paths)}  {q!r}  reference {ref!r}  model {pred!r}")
    for line in table(res):
        print(line)
    r = res["real"]
    print(f"exact match: {r['correct']}/{r['total']} = {r['accuracy']:.1%}")
    return 0
