"""Real scale on this machine: the feature cache's images/s, the training tokens/s of the real model at
upstream's lengths, and from them the projected time of upstream MiniMind-V's recipe.

Measured, at the real MiniMind2-V config (random weights: the same arithmetic as the released ones):
- images/s of the frozen CLIP ViT-B/16 filling the feature cache (`model.image_features`, no grad,
  batches of `--vit-batch` 224 px pictures), fp32 and bf16 autocast;
- tokens/s of a pretrain step (rows of 640 tokens: a 196-token image run, a prompt, a `--caption`
  token caption that takes the loss; pretrain freeze rule: projector + last block learn) and of an
  SFT step (rows of 1536 tokens, the image run, `--sft-answer` of the rest as answers; the whole LM
  and projector learn), both with cached features (`image_features` in the batch, as
  `train --feature-cache` runs them), fp32 and bf16 autocast; the step is `train.forward_loss`,
  backward, gradient clipping and the fused AdamW, as in `train.py`.

Projected: upstream's recipe is 4 epochs over 590K captioned pictures (pretrain) and 2 epochs over 150K
conversations (SFT), each row at its full length (an upper bound: `data.collate` pads to the longest
row of a batch, so shorter rows cost proportionally less), plus one encoder pass per distinct picture.

    python benchmarks/bench_real_scale.py --threads 2          # ~10 minutes on a 2-core CPU
    python benchmarks/bench_real_scale.py --device cuda --pretrain-batch 16 --sft-batch 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from minimind_v.config import VLMConfig
from minimind_v.distributed import autocast
from minimind_v.freeze import FREEZE_RULES, apply_freeze, param_groups
from minimind_v.train import forward_loss
from minimind_v.vlm import MiniMindVLM

RECIPE = {"pretrain": dict(rows=590_000, epochs=4, T=640), "sft": dict(rows=150_000, epochs=2, T=1536)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rows(cfg: VLMConfig, B: int, T: int, n_answer: int, g: torch.Generator, device) -> dict:
    """B rows of T ids in upstream's layout: a prompt token, the image run, text; the last n_answer take the loss."""
    P = cfg.num_patches
    ids = torch.randint(100, cfg.lm.vocab_size, (B, T), generator=g)
    ids[:, 1:1 + P] = cfg.image_pad_id
    labels = torch.full_like(ids, -100)
    labels[:, T - n_answer:] = ids[:, T - n_answer:]
    feats = torch.randn(B, 1, P, cfg.vision.hidden_size, generator=g)   # what the cache would return
    return {"input_ids": ids.to(device), "labels": labels.to(device), "image_features": feats.to(device)}


def time_train(model, stage: str, batch: dict, dtype: str, steps: int, device) -> list[float]:
    apply_freeze(model, FREEZE_RULES[stage])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, fused=True)
    model.train()
    model.vision_encoder.eval()
    out = []
    for i in range(steps + 1):                                  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss, _ = forward_loss(model, batch, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            out.append(time.perf_counter() - t0)
    return out


def time_vit(model, batch: int, dtype: str, steps: int, device) -> list[float]:
    S = model.cfg.vision.image_size
    pixels = torch.randn(batch, 3, S, S, device=device)
    out = []
    with torch.no_grad():
        for i in range(steps + 1):
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                model.image_features(pixels)
            sync(device)
            if i:
                out.append(time.perf_counter() - t0)
    return out


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:,.1f} days"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--vit-batch", type=int, default=16)
    ap.add_argument("--pretrain-batch", type=int, default=4, help="rows per step (upstream: 16)")
    ap.add_argument("--sft-batch", type=int, default=2, help="rows per step (upstream: 4)")
    ap.add_argument("--caption", type=int, default=64, help="caption tokens per pretrain row (take the loss)")
    ap.add_argument("--sft-answer", type=float, default=0.4, help="fraction of an SFT row's text in answers")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = VLMConfig()
    model = MiniMindVLM(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; median of {args.steps} timed steps")
    P = cfg.num_patches
    sft_answer = int(args.sft_answer * (RECIPE["sft"]["T"] - P - 1))
    batches = {"pretrain": (args.pretrain_batch, rows(cfg, args.pretrain_batch, 640, args.caption, g, device)),
               "sft": (args.sft_batch, rows(cfg, args.sft_batch, 1536, sft_answer, g, device))}
    results = {}
    for dtype in args.dtypes.split(","):
        t = statistics.median(time_vit(model, args.vit_batch, dtype, args.steps, device))
        results[("vit", dtype)] = args.vit_batch / t
        print(f"  [{dtype}] ViT-B/16 feature cache: {args.vit_batch / t:8.1f} images/s", flush=True)
        for stage, (B, batch) in batches.items():
            ts = time_train(model, stage, batch, dtype, args.steps, device)
            T = batch["input_ids"].shape[1]
            results[(stage, dtype)] = B * T / statistics.median(ts)
            print(f"  [{dtype}] {stage} B={B} T={T}: {B * T / statistics.median(ts):8.0f} tokens/s "
                  f"(steps {' '.join(f'{x:.2f}' for x in ts)} s)", flush=True)
    images = RECIPE["pretrain"]["rows"] + RECIPE["sft"]["rows"]
    print(f"\nupstream's recipe on this machine ({images:,} distinct pictures encoded once; "
          f"pretrain {RECIPE['pretrain']['epochs']} x 590K rows of 640, SFT {RECIPE['sft']['epochs']} x 150K rows of 1536)")
    print(f"| dtype | cache images/s | pretrain tokens/s | SFT tokens/s | cache | pretrain | SFT | total |")
    print(f"|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        cache_s = images / results[("vit", dtype)]
        pre_s = RECIPE["pretrain"]["rows"] * RECIPE["pretrain"]["epochs"] * 640 / results[("pretrain", dtype)]
        sft_s = RECIPE["sft"]["rows"] * RECIPE["sft"]["epochs"] * 1536 / results[("sft", dtype)]
        print(f"| {dtype} | {results[('vit', dtype)]:.1f} | {results[('pretrain', dtype)]:,.0f} | "
              f"{results[('sft', dtype)]:,.0f} | {hours(cache_s)} | {hours(pre_s)} | {hours(sft_s)} | "
              f"**{hours(cache_s + pre_s + sft_s)}** |")


if __name__ == "__main__":
    main()
