"""`minimind-v train`: the command line of the training loop in `train.py`.

Where it sits: at the top, beside the other commands. It turns the options into a TrainConfig
(each field of TrainConfig is an option, with its default written once, in the dataclass), a
recipe's settings (`recipes.py`), a model (the real config, `--model-config`, or an `--init`
directory's) and a dataset; takes the run directory's lock before anything is written into it;
and calls `train.train`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .rundir import RunLock, prepare
from .train import TrainConfig, train

def cli(argv: list[str]) -> int:
    """`minimind-v train --stage pretrain|sft --data JSONL --images DIR --tokenizer MODEL --out DIR`"""
    from .config import VLMConfig
    from .data import VLMDataset, collate
    from .options import add_config_options
    from .recipes import RECIPES, ModelInit, apply_init, get, model_config, settings_from_args
    from .rundir import initialise, read_config, tokenizer_file, write_config
    from .tokenizer import load_tokenizer
    from .vlm import MiniMindVLM, pixel_transform

    p = argparse.ArgumentParser(prog="minimind-v train", description="Pretrain or SFT a MiniMind-V model.")
    p.add_argument("--data", required=True, help="JSONL conversations in upstream MiniMind-V's format")
    p.add_argument("--images", required=True, help="folder the 'image' names are relative to")
    p.add_argument("--tokenizer", help="sentencepiece .model, tokenizer.json or its folder (default: the --init "
                                       "directory's)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--init", help="previous stage's directory, our LM model.pt, or an upstream .pth")
    p.add_argument("--clip", help="CLIP vision weights (OpenAI .pt, HF folder/safetensors/bin)")
    p.add_argument("--model-config", help="JSON file with VLMConfig fields (default: the real config, the "
                                          "--init directory's, or with --recipe its small preset)")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="named settings for training from scratch "
                   "(explicit options override them): " + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))
    p.add_argument("--image-size", type=int, default=48, help="with --recipe and no --model-config: the preset's "
                                                             "picture size")
    p.add_argument("--eval-data", help="a held-out JSONL split scored at the end (with blank/shuffled/no-image "
                                       "controls) for report.md")
    p.add_argument("--eval-images", help="its image folder (default: --images)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    add_config_options(p, TrainConfig)
    add_config_options(p, ModelInit)
    a = p.parse_args(argv)
    if a.stage is None:
        p.error("--stage is required (pretrain or sft)")
    if a.threads:
        torch.set_num_threads(a.threads)
    recipe = get(a.recipe) if a.recipe else None

    init_dir = Path(a.init) if a.init and Path(a.init).is_dir() else None
    init_info = read_config(init_dir) if init_dir is not None else {}
    tok_file = a.tokenizer or (tokenizer_file(init_dir, init_info) if init_dir is not None else None)
    if tok_file is None:
        p.error("--tokenizer is required (or an --init directory that holds one)")
    tok = load_tokenizer(tok_file, label_newline=init_info.get("label_newline"))
    if a.model_config:
        try:
            cfg = VLMConfig(**json.loads(Path(a.model_config).read_text()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{a.model_config}: not a VLMConfig JSON ({e})") from None
    elif init_dir is not None:
        cfg = VLMConfig(**init_info["model_config"])                  # an imported upstream model too
    elif recipe is not None:
        cfg = model_config(len(tok), tok.image_pad_id, a.image_size, recipe.preset)
    else:
        cfg = VLMConfig()
    if len(tok) > cfg.lm.vocab_size:
        raise ValueError(f"{tok_file}: the tokenizer has {len(tok)} pieces, more than the model's "
                         f"vocab_size {cfg.lm.vocab_size}")
    if cfg.image_pad_id != tok.image_pad_id:
        cfg.image_pad_id = tok.image_pad_id

    rank = int(os.environ.get("RANK", "0"))
    log = print if rank == 0 else (lambda *_: None)
    tcfg, init = settings_from_args(a, TrainConfig, recipe, cfg, log)      # options > the recipe > defaults
    with RunLock(a.out, log) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            prepare(a.out, tcfg.resume, tcfg.overwrite, log)      # before anything is written into OUT
        torch.manual_seed(tcfg.seed)
        model = MiniMindVLM(cfg)
        if not tcfg.resume:                                       # a resume takes every weight from its checkpoint
            initialise(model, a.init, a.clip, log=log)
            apply_init(model, init, fresh_lm=not a.init, fresh_vision=not (a.init or a.clip), log=log)
        dataset = VLMDataset(a.data, a.images, tok, max_length=tcfg.max_length, num_patches=cfg.num_patches,
                             image_size=cfg.vision.image_size, skip_bad=a.skip_bad, keep_encoded=recipe is not None,
                             transform=pixel_transform(cfg, init_info.get("image_preprocess")),
                             alpha=init_info.get("image_alpha", "white"))
        if rank == 0 and not tcfg.resume:
            keep = {k: init_info[k] for k in ("label_newline", "image_alpha", "image_position", "image_preprocess")
                    if k in init_info}
            write_config(a.out, cfg, tcfg.stage, tok_file, init=a.init, clip=a.clip, recipe=a.recipe,
                         model_init=dataclasses.asdict(init), **keep)
        try:
            result = train(model, dataset, collate, tcfg, a.out, log=log)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if rank == 0 and not result.stopped_early:
            from .report import write_report
            write_report(a.out, model, tok, eval_data=a.eval_data, eval_images=a.eval_images or a.images,
                         train_data=a.data, cached=tcfg.feature_cache, log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
