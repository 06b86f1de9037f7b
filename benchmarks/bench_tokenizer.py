"""Byte-level BPE speed: our pure-Python `minimind_v.bpe` against `tokenizers` (Rust), one thread.

    OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 python benchmarks/bench_tokenizer.py [--file tokenizer.json] [--mb 1]

The text is generated with a fixed random seed: half English sentences, half Chinese ones whose
characters are drawn from the vocabulary's own Chinese pieces (each Chinese sentence is one long
BPE word until its punctuation, and nearly every one is new, so the word cache helps little
there: a harsh case). The text is cut into documents at its newlines (a few hundred bytes each,
like one training sample) and both tokenizers encode them one call each; the ids are checked
equal, then the figures are printed in MB of UTF-8 per CPU second of this process (best of 3;
CPU time, so that other work on a shared machine does not count; both run on one thread), for
ours with a cold word cache (emptied before each pass) and a warm one.
Without --file it uses upstream MiniMind2-V's tokenizer.json from ../shared/upstream when present,
else a 6400-piece byte-level BPE trained here with `tokenizers` on the generated text.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")       # tokenizers' thread pool: one thread
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minimind_v.bpe import ByteLevelBPE  # noqa: E402

UPSTREAM = ROOT.parent / "shared" / "upstream" / "minimind2-v" / "tokenizer.json"
EN = ("the a picture shows red green blue circle square triangle in at on left right top bottom "
      "of is what where how many colour shape model image token language vision small large "
      "I'm it's we've they'll you'd and or not with from this that there 2024 16 196 3.14").split()


def mixed_text(n_bytes: int, chinese_chars: list[str], seed: int = 0) -> str:
    """About n_bytes of UTF-8: English and Chinese sentences alternating, with newlines and emoji."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        if rng.random() < 0.5:
            s = " ".join(rng.choices(EN, k=rng.randint(5, 15))).capitalize() + rng.choice([". ", "? ", "!\n"])
        else:
            s = "".join("".join(rng.choices(chinese_chars, k=rng.randint(3, 12))) + rng.choice("，、")
                        for _ in range(rng.randint(1, 3)))[:-1] + rng.choice(["。", "？", "！\n", "😀。"])
        parts.append(s)
        size += len(s.encode())
    return "".join(parts)


def chinese_pieces(tok: ByteLevelBPE) -> list[str]:
    """The vocabulary's pieces that decode to Chinese characters only (so text looks like real text)."""
    out = []
    for piece, i in tok.vocab.items():
        s = tok.decode([i])
        if s and all("\u4e00" <= c <= "\u9fff" for c in s):
            out.append(s)
    return out or [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def train_tokenizer(text: str, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=6400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t.save(str(out))
    return out


def rate(fn, docs: list[str], before=lambda: None, repeat: int = 3) -> tuple[float, list[int]]:
    """Best MB/s of `repeat` passes of fn over all docs (before() runs untimed before each pass)."""
    n_bytes = sum(len(d.encode()) for d in docs)
    best = 0.0
    for _ in range(repeat):
        before()
        t0 = time.process_time()
        ids = [i for d in docs for i in fn(d)]
        best = max(best, n_bytes / 1e6 / (time.process_time() - t0))
    return best, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", type=Path, help="a byte-level BPE tokenizer.json")
    ap.add_argument("--mb", type=float, default=1.0, help="MB of text to encode")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    path = args.file or (UPSTREAM if UPSTREAM.is_file() else None)
    tmp = tempfile.TemporaryDirectory()
    if path is None:
        zh = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
        path = train_tokenizer(mixed_text(2_000_000, zh, seed=1), Path(tmp.name) / "tokenizer.json")
    ours = ByteLevelBPE.from_file(path)
    ours.encode("warm up the split regex")        # builds the character classes (~0.5 s, once)
    ref = Tokenizer.from_file(str(path))
    text = mixed_text(int(args.mb * 1e6), chinese_pieces(ours))

    def theirs(s):
        return ref.encode(s, add_special_tokens=False).ids

    docs = text.splitlines(keepends=True)
    cold, ids = rate(ours.encode, docs, before=ours._cache.clear)
    warm, _ = rate(ours.encode, docs)
    peer, ref_ids = rate(theirs, docs)
    assert ids == ref_ids, "ours and tokenizers disagree on the benchmark text"
    print(f"file {path}")
    print(f"text {len(text.encode()) / 1e6:.2f} MB in {len(docs)} documents ({len(text)} characters, {len(ids)} tokens)")
    print(f"ours (pure Python)  cold cache {cold:6.2f} MB/s   warm cache {warm:6.2f} MB/s")
    print(f"tokenizers (Rust)              {peer:6.2f} MB/s   ratio ours/tokenizers {cold / peer:.3f} cold, "
          f"{warm / peer:.3f} warm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
