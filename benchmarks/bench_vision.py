"""Our CLIP ViT-B/16 vs transformers' CLIPVisionModel at the same weights, in one run.

Forward of a batch of images (default 8 x 3 x 224 x 224) under torch.inference_mode, in float32
and under bfloat16 autocast. Ours runs with the hand-written attention ("manual", the default)
and with the opt-in F.scaled_dot_product_attention ("sdpa"); transformers runs with its default
attention. The implementations are timed in turns (round-robin, best of the repeats), so that
load from other work on a shared machine hits all of them alike. Prints milliseconds and the
ratio  transformers / ours  (> 1: ours is faster). Weights are random (nothing is downloaded).

    python benchmarks/bench_vision.py
    python benchmarks/bench_vision.py --batch 8 --repeats 5 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from minimind_v.clip_weights import build_model, infer_config, to_our_names


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="float32,bf16", help="comma-separated: float32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(patch_size=16)).eval().to(dev)     # ViT-B/16 shape
    sd, _ = to_our_names(hf.state_dict(), "transformers CLIPVisionModel")
    cfg = infer_config(sd, "transformers CLIPVisionModel")
    ours = {impl: build_model({k: v.clone() for k, v in sd.items()}, cfg, "bench", attn_impl=impl).to(dev)
            for impl in ("manual", "sdpa")}
    x = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, device=dev)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, transformers attention: {hf.config._attn_implementation}")

    with torch.inference_mode():
        diff = (ours["manual"](x) - hf(pixel_values=x).last_hidden_state).abs().max().item()
    print(f"same weights check: max |ours - transformers| last hidden state = {diff:.2e}")

    fns = {"ours (manual attn)": lambda: ours["manual"](x),
           "ours (sdpa)": lambda: ours["sdpa"](x),
           "transformers": lambda: hf(pixel_values=x).last_hidden_state}
    for mode in args.modes.split(","):
        if mode not in ("float32", "bf16"):
            parser.error(f"unknown mode {mode!r}")
        ctx = (torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16) if mode == "bf16"
               else contextlib.nullcontext())
        times = {name: [] for name in fns}
        with torch.inference_mode(), ctx:
            for name, fn in fns.items():           # warm-up
                fn()
            sync(dev)
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    sync(dev)
                    times[name].append((time.perf_counter() - t0) * 1e3)
        best = {name: min(t) for name, t in times.items()}
        ref = best["transformers"]
        print(f"\n{'bf16 autocast' if mode == 'bf16' else mode}:")
        for name, ms in best.items():
            med = sorted(times[name])[len(times[name]) // 2]
            print(f"  {name:20s} best {ms:9.1f} ms  median {med:9.1f} ms   "
                  f"transformers / this (best) = {ref / ms:5.2f}x")


if __name__ == "__main__":
    main()
