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
  drawn larger than usual (`recipes.py`: the demo trains with the `from-scratch-small` recipe).

Two stages, as MiniMind2-V: a short pretraining on captions (projector + last LM block learn),
then SFT on the questions (LM + projector learn). The question comes before `<image>` in every
record, so with the causal mask the image positions can already see what is asked.

What to expect: the SFT loss first drops to about 0.7 (the answer's format, guessed from the
question alone), then falls in steps as the model learns to read colour, shape and position from
the picture (seed 0, two threads: 0.32 at step 1000, 0.02 at step 2000). The run prints a progress line
per interval, the held-out exact-match accuracy per question type with the vision-reliance controls
(blank, shuffled and no pictures, the majority and question baselines: `evaluation.py`) and a few examples, and saves
a picture grid of test images with questions and answers and `sft/report.md` (`report.py`).

Two threads by default: a run is reproducible for a given CPU and thread count (`--threads 1` gives
other, equally reproducible answers). On an idle 2-core AVX-512 CPU the whole run takes about two
and a half minutes (README: the seven seeds; an AVX2 one took 4m18s-4m38s with the former 4000
steps). `--fast` runs the SFT stage with a compiled step, under bf16 autocast where the CPU has
native bf16 (AVX-512): faster once inductor's cache is warm, not bitwise repeatable.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from .config import VLMConfig
from .lm import count_parameters
from .recipes import ModelInit, apply_init, get, init_for, model_config, resolve
from .rundir import write_config
from .train import TrainConfig, native_bf16, train

# the demo's data; the model and training settings are the recipes' (`recipes.py`): the full demo is
# `from-scratch-small`, --quick is `smoke` (a check that runs in seconds, not a good model). One
# departure, printed with the stage: 3500 SFT steps, not the recipe's 4000 (made for data nobody
# has seen yet): the demo's pictures are learned by then on seeds 0-6 (README: the seven seeds)
FULL = dict(n_train=24000, n_test=500, recipe="from-scratch-small", sft_steps=3500)
QUICK = dict(n_train=96, n_test=24, recipe="smoke")
# --fast: the same recipe and steps on both cores, the SFT step compiled (see `fast_sft`)
FAST = dict(sft_steps=FULL["sft_steps"])


def fast_sft(native: bool) -> dict:
    """--fast's SFT settings: a compiled step (torch.compile, ~30 s the first time), under bf16
    autocast only on a CPU with native bf16 (AVX-512; an AVX2 CPU emulates it, so it stays fp32).
    A different float path from the default run's, so other answers than it."""
    return {"compile": True, "dtype": "bf16" if native else "fp32"}


def demo_config(vocab_size: int, image_pad_id: int, recipe) -> VLMConfig:
    """48 px pictures, 16 px patches: one patch per cell of the 3x3 grid; sizes from the recipe's
    preset. CLIP's patch stem, not the preset's "both": each shape is centred in its own patch,
    which the patch stem reads, and the demo's seven seeds were measured with it."""
    return model_config(vocab_size, image_pad_id, image_size=48, preset=recipe.preset, stem="patch")


def run(out_dir, seed: int = 0, quick: bool = False, threads: int | None = None, log=print, **overrides) -> dict:
    """The whole demo; returns {"accuracy", "seconds", "checkpoint", "grid", ...}."""
    from .data import VLMDataset, collate
    from .evaluation import controls, table
    from .report import save_grid, write_report
    from .synthetic import answer_words, make_dataset
    from .tokenizer import Tokenizer
    from .vlm import MiniMindVLM

    s = dict(QUICK if quick else FULL)
    recipe = get(s["recipe"])
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

    # 3. model: the recipe's preset and initialisation (a frozen random ViT with its position
    # embeddings x10, token embeddings drawn with std 0.1: recipes.py says why)
    cfg = demo_config(len(tok), tok.image_pad_id, recipe)
    torch.manual_seed(seed)
    model = MiniMindVLM(cfg)
    init, _ = resolve(ModelInit, init_for(recipe, cfg.vision.stem), {})
    apply_init(model, init, log=lambda m: None)
    n_lm = count_parameters(model.lm)
    n_all = count_parameters(model)
    log(f"      model: {n_all:,} parameters ({n_lm:,} language model, "
        f"{count_parameters(model.vision_encoder):,} frozen vision encoder); recipe {recipe.name}")
    # check_images=False: the feature cache decodes every picture before the first step anyway, and a
    # picture that does not read stops it there, naming its record
    datasets = {split: VLMDataset(data / f"{split}_train.jsonl", data / "images", tok, max_length=128, keep_encoded=True,
                                  num_patches=cfg.num_patches, image_size=48, check_images=False)
                for split in ("pretrain", "sft")}
    steps = {"pretrain": overrides.get("pretrain_steps"), "sft": overrides.get("sft_steps", s.get("sft_steps"))}
    stages = {}
    for i, stage in enumerate(("pretrain", "sft"), start=3):
        given = dict(stage=stage, cache_dir=str(out / "feature_cache"), seed=seed, overwrite=True)  # the folder is the demo's
        if steps[stage] is not None:
            given["max_steps"] = steps[stage]
        if stage == "sft" and overrides.get("fast"):   # FAST: the step compiled, bf16 where native
            given.update(fast_sft(native_bf16("cpu")))
        tcfg, _ = resolve(TrainConfig, recipe.stages[stage], given)
        ckpt = out / stage
        write_config(ckpt, cfg, stage, tok.model_file, demo_seed=seed, recipe=recipe.name,
                     init=str(out / "pretrain") if stage == "sft" else None, model_init=vars(init))
        log(f"[{i}/5] {stage}: {'captions' if stage == 'pretrain' else 'questions and answers'}, {tcfg.max_steps} steps"
            + (f", compiled, {tcfg.dtype}" if tcfg.compile else ""))
        stages[stage] = train(model, datasets[stage], collate, tcfg, ckpt, log=lambda m: log("      " + m))
        lap(stage)

    # 5. evaluate on held-out pictures, with the controls: blank / shuffled / no picture, majority answer
    model.eval()
    log("[5/5] held-out exact match, and the same model without the real pictures:")
    results = controls(model, tok, data / "sft_test.jsonl", data / "images", data / "sft_train.jsonl")
    res = results["real"]
    lap("eval")
    for line in table(results):
        log("      " + line)
    log(f"      held-out exact match: {res['correct']}/{res['total']} = {res['accuracy']:.1%}")
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
    english_only = dict(results, real=dict(res, examples=english))
    report = write_report(out / "sft", model, tok, cached=True, stages=[out / "pretrain", out / "sft"],
                          results=english_only, log=lambda m: log("      " + m))
    lap("report")
    total = time.time() - t0
    log(f"saved {grid}, {report}; checkpoint {out / 'sft'} (try: minimind-v chat --checkpoint {out / 'sft'} "
        f"--image {english[0][0][0] if english else 'PICTURE'} \"How many shapes are there?\")")
    log("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    return {"accuracy": res["accuracy"], "by_type": res["by_type"], "seconds": total, "timings": timings,
            "checkpoint": str(out / "sft"), "grid": str(grid), "examples": res["examples"], "controls": results,
            "report": str(report), "losses": {k: v.losses for k, v in stages.items()}}


def cli(argv: list[str]) -> int:
    """`minimind-v demo [--out DIR] [--seed S] [--quick]`"""
    p = argparse.ArgumentParser(prog="minimind-v demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="minimind-v-demo", help="working folder (data, checkpoints, pictures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run in seconds (checks the pipeline, learns little)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (default 2; a run is reproducible for a given CPU and thread count, "
                        "and another count changes the float sums, so other answers)")
    p.add_argument("--fast", action="store_true",
                   help="SFT with a compiled step on 2 threads, in bf16 autocast where the CPU has native bf16 "
                        "(AVX-512); needs a C++ compiler")
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--pretrain-steps", type=int)
    a = p.parse_args(argv)
    over = {k: v for k, v in (("sft_steps", a.sft_steps), ("pretrain_steps", a.pretrain_steps)) if v is not None}
    threads = a.threads
    if a.fast:
        over = {"sft_steps": FAST["sft_steps"], **over, "fast": True}
    run(a.out, a.seed, a.quick, threads, **over)
    return 0
