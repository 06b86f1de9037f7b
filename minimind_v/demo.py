"""`minimind-v demo`: the whole pipeline on a small model, end to end, on a CPU in minutes.

    generate shapes  ->  train tokenizer  ->  pretrain (captions)  ->  SFT (questions)  ->  evaluate
    (synthetic.py)       (tokenizer.py)       (train.py, stage 1)      (train.py, stage 2)  (chat.py)

The model is MiniMind-V's architecture with small numbers (the real config is the default
everywhere else):
- vision: a ViT with 48 px inputs and 16 px patches, so the 3x3 grid of the pictures is exactly
  one patch per cell (9 patch vectors per image), 128 wide, one layer, frozen at its random
  initialisation. A frozen random ViT is a fixed random feature map: each patch vector still
  tells apart the colours and shapes drawn in its cell, and the projector learns to read it.
  One layer, because every random attention layer mixes the patches at random, which blurs
  which cell holds what (with two layers some seeds learned the "where" questions far later).
  Because it never changes, its features are computed once (the feature cache);
- language model: hidden 128, 2 layers, 4 query heads sharing 2 key/value heads, and embeddings
  drawn larger than usual (see `run`).

Two stages, as MiniMind2-V: a short pretraining on captions (projector + last LM block learn),
then SFT on the questions (LM + projector learn). The question comes before `<image>` in every
record, so with the causal mask the image positions can already see what is asked.

What to expect: the SFT loss first drops to about 0.7 (the answer's format, guessed from the
question alone), then falls in steps as the model learns to read colour, shape and position from
the picture (seed 0: 0.47 at step 1000, 0.03 at step 2000). The run prints a progress line
per interval, the held-out exact-match accuracy per question type and a few examples, and saves a
picture grid of test images with questions and answers. With a single thread the whole run takes
about 5.5 to 6 minutes on a 2-core CPU with AVX-512 (on an older AVX2 one, the same training with
a third of the pictures took 7.5 to 8.5 minutes; the extra pictures add ~20 s of generation and
feature caching).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from .config import LMConfig, VisionConfig, VLMConfig
from .rundir import write_config
from .train import TrainConfig, train

# the demo's settings; --quick shrinks them to run in seconds (a smoke test, not a good model)
FULL = dict(n_train=24000, n_test=500, pretrain_steps=120, sft_steps=4000, batch_size=64, lr=2e-3,
            hidden=128, layers=2, vision_hidden=128, vision_layers=1, embed_std=0.1,
            pos_scale=10.0)
QUICK = dict(n_train=96, n_test=24, pretrain_steps=4, sft_steps=12, batch_size=16, lr=2e-3,
             hidden=32, layers=2, vision_hidden=32, vision_layers=1, embed_std=0.1,
             pos_scale=10.0)


def demo_config(vocab_size: int, image_pad_id: int, s: dict) -> VLMConfig:
    heads = max(2, s["hidden"] // 32)
    return VLMConfig(
        lm=LMConfig(vocab_size=vocab_size, hidden_size=s["hidden"], num_layers=s["layers"], num_heads=heads,
                    num_kv_heads=heads // 2, max_seq_len=256),
        vision=VisionConfig(image_size=48, patch_size=16, hidden_size=s["vision_hidden"],
                            num_layers=s["vision_layers"], num_heads=max(2, s["vision_hidden"] // 32),
                            intermediate_size=4 * s["vision_hidden"]),
        image_pad_id=image_pad_id, num_patches=9)


def save_grid(examples: list, path: Path, columns: int = 4, cell: int = 144) -> None:
    """Test pictures with their question, the reference and the model's answer (green if right)."""
    from PIL import Image, ImageDraw

    rows = (len(examples) + columns - 1) // columns
    text_h = 52
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (paths, question, ref, pred) in enumerate(examples):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        with Image.open(paths[0]) as im:
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x + 3, y + cell + 2), question.replace("<image>", "").strip()[:28], fill="black")
        draw.text((x + 3, y + cell + 18), f"model: {pred}"[:28], fill=(0, 130, 0) if pred == ref else (200, 0, 0))
        if pred != ref:
            draw.text((x + 3, y + cell + 34), f"truth: {ref}"[:28], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run(out_dir, seed: int = 0, quick: bool = False, threads: int | None = None, log=print, **overrides) -> dict:
    """The whole demo; returns {"accuracy", "seconds", "checkpoint", "grid", ...}."""
    from .chat import evaluate
    from .data import VLMDataset, collate
    from .synthetic import answer_words, make_dataset
    from .tokenizer import Tokenizer
    from .vlm import MiniMindVLM

    s = dict(QUICK if quick else FULL, **overrides)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    t0 = time.time()
    timings = {}

    def lap(name):
        timings[name] = time.time() - t0 - sum(timings.values())

    # 1. data
    data = out / "data"
    for old in (data, out / "feature_cache"):
        if old.exists():
            shutil.rmtree(old)
    make_dataset(data, s["n_train"], s["n_test"], seed=seed, image_size=48)
    log(f"[1/5] generated {s['n_train']} training and {s['n_test']} held-out pictures with captions "
        f"and questions -> {data}")
    lap("data")

    # 2. tokenizer: every answer word one whole piece
    tok = Tokenizer.train([data / "pretrain_train.jsonl", data / "sft_train.jsonl"], out / "tokenizer" / "demo",
                          vocab_size=1000, user_defined_symbols=answer_words())
    log(f"[2/5] trained a BPE tokenizer: {len(tok)} pieces, every answer word one piece")
    lap("tokenizer")

    # 3. model
    cfg = demo_config(len(tok), tok.image_pad_id, s)
    torch.manual_seed(seed)
    model = MiniMindVLM(cfg)
    with torch.no_grad():
        # The output layer is the embedding matrix (tied). At the usual std 0.02 its rows have norm
        # 0.02 * sqrt(128) = 0.23, and the final RMSNorm gives h a norm of sqrt(128) = 11.3, so no
        # logit can exceed 11.3 * 0.23 = 2.6: over 600+ pieces the model cannot be confident. The real
        # model starts from a trained LM whose embeddings are far larger; starting from scratch, and
        # with the embeddings frozen during pretraining, we draw them larger instead.
        model.lm.embed_tokens.weight.normal_(0.0, s["embed_std"])
        # The random ViT's position embeddings (std D^-0.5 = 0.09) are ~6x weaker than the content
        # its patch convolution writes (~0.6), so a patch vector barely says where it sits, and
        # "What is at the bottom left?" has little to go on. A trained CLIP has learned strong
        # ones; our frozen random encoder gets them scaled up instead: x10, a little louder than
        # the content. (x6 took position questions from 78% to 87% at 3000 steps, but left one
        # seed in five at 91% overall, position 75%; lesson 10 has the runs.)
        model.vision_encoder.position_embedding.mul_(s["pos_scale"])
    n_lm = sum(p.numel() for p in model.lm.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    log(f"      model: {n_all:,} parameters ({n_lm:,} language model, "
        f"{sum(p.numel() for p in model.vision_encoder.parameters()):,} frozen vision encoder)")
    datasets = {split: VLMDataset(data / f"{split}_train.jsonl", data / "images", tok, max_length=128, keep_encoded=True,
                                  num_patches=cfg.num_patches, image_size=48) for split in ("pretrain", "sft")}
    common = dict(batch_size=s["batch_size"], lr=s["lr"], epochs=10 ** 6, warmup_steps=0, feature_cache=True,
                  cache_dir=str(out / "feature_cache"), log_every=100 if not quick else 4, seed=seed,
                  overwrite=True)      # the demo's folder is its own: each run replaces the last
    stages = {}
    for i, (stage, steps) in enumerate((("pretrain", s["pretrain_steps"]), ("sft", s["sft_steps"])), start=3):
        ckpt = out / stage
        write_config(ckpt, cfg, stage, tok.model_file, demo_seed=seed)
        log(f"[{i}/5] {stage}: {'captions' if stage == 'pretrain' else 'questions and answers'}, {steps} steps")
        stages[stage] = train(model, datasets[stage], collate, TrainConfig(stage=stage, max_steps=steps, **common),
                              ckpt, log=lambda m: log("      " + m))
        lap(stage)

    # 5. evaluate on held-out pictures
    model.eval()
    res = evaluate(model, tok, data / "sft_test.jsonl", data / "images")
    lap("eval")
    log(f"[5/5] held-out exact match: {res['correct']}/{res['total']} = {res['accuracy']:.1%}")
    for qtype, (c, n) in res["by_type"].items():
        log(f"      {qtype:9s} {c:4d}/{n:<4d} {c / n:6.1%}")
    lines = [json.loads(x) for x in (data / "sft_test.jsonl").read_text(encoding="utf-8").splitlines()]
    english = [ex for ex, rec in zip(res["examples"], lines) if rec.get("lang") == "en"]
    chinese = [ex for ex, rec in zip(res["examples"], lines) if rec.get("lang") != "en"]
    log("      examples:")
    for paths, q, ref, pred in english[:4] + chinese[:2]:
        mark = "ok " if pred == ref else "BAD"
        log(f"      {mark} {Path(paths[0]).name}  {q.replace('<image>', '').strip()}  ->  {pred}"
            + ("" if pred == ref else f"   (truth: {ref})"))
    grid = out / "answers.png"
    save_grid(english[:12], grid)          # Pillow's built-in font draws Latin text only
    total = time.time() - t0
    log(f"saved {grid}; checkpoint {out / 'sft'} (try: minimind-v chat --checkpoint {out / 'sft'} "
        f"--image {english[0][0][0] if english else 'PICTURE'} \"How many shapes are there?\")")
    log("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    return {"accuracy": res["accuracy"], "by_type": res["by_type"], "seconds": total, "timings": timings,
            "checkpoint": str(out / "sft"), "grid": str(grid), "examples": res["examples"],
            "losses": {k: v.losses for k, v in stages.items()}}


def cli(argv: list[str]) -> int:
    """`minimind-v demo [--out DIR] [--seed S] [--quick]`"""
    p = argparse.ArgumentParser(prog="minimind-v demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="minimind-v-demo", help="working folder (data, checkpoints, pictures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run in seconds (checks the pipeline, learns little)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1, which makes the run reproducible on a given CPU; 2 threads "
                        "were 1.7x faster on an idle 2-core machine, but change the float sums and so the result)")
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--pretrain-steps", type=int)
    a = p.parse_args(argv)
    over = {k: v for k, v in (("sft_steps", a.sft_steps), ("pretrain_steps", a.pretrain_steps)) if v is not None}
    run(a.out, a.seed, a.quick, a.threads, **over)
    return 0
