"""The conv stem's forward (`vision.ConvStem`), as `ConvStem` runs it vs the plain order, same weights.

plain: conv (NCHW) -> ReLU -> max over each patch, the order the docstring describes;
ours: conv in channels-last (NHWC) -> max -> ReLU (the same numbers: ReLU is monotone).
Both at the `small` preset's 256 feature maps; pictures random, batch 64. Prints images/s of each
and the ratio, median of --repeats, after one warm-up call each.

    python benchmarks/bench_conv_stem.py --image-size 75 --patch-size 15 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from minimind_v.config import VisionConfig
from minimind_v.vision import ConvStem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=75)
    p.add_argument("--patch-size", type=int, default=15)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=a.image_size, patch_size=a.patch_size, hidden_size=128, num_layers=1,
                       num_heads=4, intermediate_size=512, stem="conv", stem_channels=a.channels)
    stem = ConvStem(cfg).eval()
    pixels = torch.randn(a.batch, 3, a.image_size, a.image_size)

    def plain(x):
        return stem.pool(torch.relu(stem.conv(x)))

    contestants = {"plain (NCHW, ReLU then max)": plain, "ours (ConvStem.forward)": stem}
    with torch.no_grad():
        torch.testing.assert_close(stem(pixels), plain(pixels), rtol=1e-5, atol=1e-5)   # same numbers
        times = {name: [] for name in contestants}
        for name, f in contestants.items():
            f(pixels)                                                      # warm-up
        for _ in range(a.repeats):                                         # alternate, so load hits both
            for name, f in contestants.items():
                t = time.perf_counter()
                f(pixels)
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["plain (NCHW, ReLU then max)"]
    print(f"conv stem, {a.channels} maps, {a.image_size} px / {a.patch_size} px patches, batch {a.batch}, "
          f"{a.threads} thread(s), median of {a.repeats}")
    for name, m in med.items():
        print(f"  {name:30s} {a.batch / m:8.1f} images/s   {base / m:5.2f}x")


if __name__ == "__main__":
    main()
