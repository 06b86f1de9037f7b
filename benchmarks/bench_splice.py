"""Vectorized `splice` and the fused kernel vs the loop reference `splice_loop` vs one plain copy
of `h`, in one run.

The copy `h.clone()` is the floor for any splice that returns a new tensor: every byte of `h` has
to be read and written once. `fused` is `minimind_v.ops.fused_splice` (kernels/splice.cpp, CPU),
which writes every output row once; its column is empty where the kernel cannot be built.
`splice_loop` keeps upstream's cost structure (a host synchronisation per row, a `torch.cat` per
run, a `torch.stack` at the end); `upstream` is upstream MiniMind-V's `count_vision_proj` itself
(tests/upstream_splice.py, projection already applied), with its `.item()` per match.

    python benchmarks/bench_splice.py                          # CPU, B in {1, 16, 64}, T=640, D=512
    python benchmarks/bench_splice.py --threads 1 --clock thread   # CPU time of this thread only
    python benchmarks/bench_splice.py --device cuda            # where a GPU is available

`--clock thread` (CPU only, with one thread) counts only the time this thread ran, so other
processes on a shared machine disturb it less than the wall clock.
Prints the best time of each and the ratios splice/copy, fused/copy, loop/splice and upstream/splice.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from minimind_v.splice import splice, splice_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from upstream_splice import upstream_count_vision_proj  # noqa: E402  (the one transcription of upstream's)

try:                                    # the fused kernel needs a C++ compiler (minimind_v.ops builds it)
    from minimind_v.ops import fused_splice
except RuntimeError as e:
    fused_splice, FUSED_ERROR = None, str(e)




def make_batch(B: int, T: int, D: int, L: int, n_images: int, pad_id: int, device, seed: int = 0):
    """Random text ids (never the pad id) with `n_images` placeholder runs per row at random places."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 6400, (B, T), generator=g)
    for b in range(B):
        # n_images runs in distinct L-sized slots, shifted by a random offset so rows differ
        gap = (T - n_images * L) // (n_images + 1)
        offset = int(torch.randint(0, max(gap, 1), (1,), generator=g))
        for n in range(n_images):
            s = offset + n * (L + gap)
            ids[b, s:s + L] = pad_id
    h = torch.randn(B, T, D, generator=g)
    img = torch.randn(B, n_images, L, D, generator=g)
    return ids.to(device), h.to(device), img.to(device)


def timeit(fn, device, repeat: int, min_time: float = 0.2, clock=time.perf_counter) -> float:
    """Best seconds per call over `repeat` timed blocks (each block long enough to measure).

    The minimum, as Python's `timeit` recommends: on a shared machine the other blocks measure
    the neighbours as much as the code."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    # calls per block so that a block takes about min_time / repeat
    t0 = clock()
    fn()
    sync()
    once = max(clock() - t0, 1e-6)
    per_block = max(1, int(min_time / repeat / once))
    times = []
    for _ in range(repeat):
        sync()
        t0 = clock()
        for _ in range(per_block):
            fn()
        sync()
        times.append((clock() - t0) / per_block)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--images", type=int, nargs="+", default=[1, 2])
    p.add_argument("--T", type=int, default=640)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--L", type=int, default=196)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: CPU time of this thread (CPU device, one thread only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock thread needs --device cpu and --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    pad = 34
    image_ids = [pad] * args.L
    print(f"device={args.device} T={args.T} D={args.D} L={args.L} threads={torch.get_num_threads()} "
          f"clock={args.clock} torch={torch.__version__}")
    if fused_splice is None:
        print(f"fused kernel not built, its columns are empty: {FUSED_ERROR}")
    print(f"{'B':>4} {'imgs':>4} {'copy ms':>9} {'splice ms':>10} {'fused ms':>9} {'loop ms':>9} {'upstr ms':>9} "
          f"{'splice/copy':>12} {'fused/copy':>11} {'loop/splice':>12} {'upstr/splice':>12}")
    for B in args.batch:
        for n in args.images:
            ids, h, img = make_batch(B, args.T, args.D, args.L, n, pad, args.device)
            want = splice_loop(ids, h, img, image_ids)
            assert torch.equal(splice(ids, h, img, image_ids), want)
            assert torch.equal(upstream_count_vision_proj(ids, h, img, image_ids), want)
            t_copy = timeit(lambda: h.clone(), args.device, args.repeat, clock=clock)
            t_fast = timeit(lambda: splice(ids, h, img, image_ids), args.device, args.repeat, clock=clock)
            t_fused = float("nan")
            if fused_splice is not None and h.device.type == "cpu":
                assert torch.equal(fused_splice(ids, h, img, image_ids), want)
                t_fused = timeit(lambda: fused_splice(ids, h, img, image_ids), args.device, args.repeat, clock=clock)
            t_loop = timeit(lambda: splice_loop(ids, h, img, image_ids), args.device, args.repeat, clock=clock)
            t_upstream = timeit(lambda: upstream_count_vision_proj(ids, h, img, image_ids), args.device, args.repeat,
                            clock=clock)
            print(f"{B:>4} {n:>4} {t_copy * 1e3:>9.3f} {t_fast * 1e3:>10.3f} {t_fused * 1e3:>9.3f} "
                  f"{t_loop * 1e3:>9.3f} {t_upstream * 1e3:>9.3f} {t_fast / t_copy:>11.2f}x "
                  f"{t_fused / t_copy:>10.2f}x {t_loop / t_fast:>11.2f}x "
                  f"{t_upstream / t_fast:>11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
