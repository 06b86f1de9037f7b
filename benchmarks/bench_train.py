"""Tokens/s of one training step at the real MiniMind2-V config: with and without the
vision-feature cache, fp32 and bf16 autocast, measured in the same run.

A step = forward (frozen CLIP ViT-B/16 on the pictures, or a read of their cached features) +
projector + splice + 26M LM, loss on the assistant tokens, backward, clip, AdamW (pretrain freeze
rule: projector + last block learn). Each row carries one 224 px picture (196 placeholder ids)
and `--seq` tokens in all, like a caption record.

    python benchmarks/bench_train.py                   # B=2, T=256, 3 timed steps per setting
    python benchmarks/bench_train.py --batch 4 --steps 5 --stage sft
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from minimind_v.config import VLMConfig
from minimind_v.distributed import autocast
from minimind_v.features import FeatureCache
from minimind_v.freeze import FREEZE_RULES, apply_freeze, param_groups
from minimind_v.train import forward_loss
from minimind_v.vlm import MiniMindVLM


def make_batch(cfg: VLMConfig, B: int, T: int, g: torch.Generator) -> dict:
    P = cfg.num_patches
    ids = torch.randint(10, cfg.lm.vocab_size, (B, T), generator=g)
    ids[:, 4:4 + P] = cfg.image_pad_id                       # one picture per row
    labels = ids.clone()
    labels[:, :4 + P + 8] = -100                             # loss on the reply only
    S = cfg.vision.image_size
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(B, 1, 3, S, S, generator=g),
            "image_paths": [[f"img{b}.png"] for b in range(B)]}


def time_steps(model, batch, dtype: str, cache, steps: int, opt) -> float:
    """Seconds per optimizer step (median of `steps`, after one warm-up step)."""
    device = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        step_batch = batch
        if cache is not None:                              # features read from the cache, no pixels
            step_batch = {**batch, "pixel_values": None, "image_features": cache.lookup(batch["image_paths"])}
        with autocast(device, dtype):
            loss, _ = forward_loss(model, step_batch, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = VLMConfig()                                        # the real config
    model = MiniMindVLM(cfg).train()
    apply_freeze(model, FREEZE_RULES[a.stage])
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    batch = make_batch(cfg, a.batch, a.seq, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        items = [{"image_paths": paths, "pixel_values": batch["pixel_values"][b]}
                 for b, paths in enumerate(batch["image_paths"])]
        cache = FeatureCache.build(Path(tmp), model.image_features, items, "bench", log=lambda *_: None)
        tokens = a.batch * a.seq
        print(f"real config, stage {a.stage}: B={a.batch}, T={a.seq} ({tokens} tokens, {a.batch} pictures "
              f"of 224 px), {a.threads} threads, median of {a.steps} steps")
        rows = {}
        for dtype in ("fp32", "bf16"):
            for use_cache in (False, True):
                sec = time_steps(model, batch, dtype, cache if use_cache else None, a.steps, opt)
                rows[(dtype, use_cache)] = sec
                print(f"  {dtype}  {'cached features' if use_cache else 'encoder each step'}:  "
                      f"{sec * 1000:8.0f} ms/step  {tokens / sec:8.0f} tokens/s", flush=True)
    base = rows[("fp32", False)]
    print("speedup vs fp32 + encoder each step: " + ", ".join(
        f"{d}{' + cache' if c else ''} {base / s:.2f}x" for (d, c), s in rows.items()))


if __name__ == "__main__":
    main()
