"""Fused RMSNorm (kernels/, minimind_v.ops) vs eager `rms_norm` and `F.rms_norm`, in one run.

For each shape and dtype it times forward and forward+backward, plus a memory floor measured in
the same run: the plainest torch ops that allocate and move the same bytes as the fused op,
    forward          reads x, writes a new y              floor: x.clone()
    forward+backward + reads grad_y and x, writes new dx  floor: x.clone() and torch.add(grad_y, x)
(the weight, rstd and dw are one value per column or row: negligible). Prints milliseconds
(best of the repeats, timed round-robin) and the ratios  eager / fused,  F.rms_norm / fused,  fused / floor.

    python benchmarks/bench_rmsnorm.py                  # all shapes, float32 and bfloat16
    python benchmarks/bench_rmsnorm.py --shapes 5120x512 --dtypes float32 --repeats 20
    python benchmarks/bench_rmsnorm.py --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from minimind_v import ops
from minimind_v.norm import rms_norm

EPS = 1e-5


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_times(fns: dict, repeats: int, device: str, warmup: int) -> dict:
    """Best (minimum) wall time in ms of each fn, timed round-robin: one call of each per round.

    The minimum, because on a machine shared with other work the noise only ever adds time; and
    round-robin, so that a burst of other work hits every contender alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def impls(D):
    return {
        "eager": lambda x, w: rms_norm(x, w, EPS),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (D,), w, EPS),
        "fused": lambda x, w: ops.fused_rms_norm(x, w, EPS),
    }


def bench_one(N, D, dtype, device, repeats, warmup):
    """-> {(name, pass): ms} for name in floor/eager/F.rms_norm/fused, pass in fwd/fwd+bwd."""
    x = torch.randn(N, D, device=device, dtype=dtype)
    w = (torch.rand(D, device=device) + 0.5).to(dtype)
    gy = torch.randn(N, D, device=device, dtype=dtype)
    xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    # the floor: the plainest torch ops that allocate and move the same bytes as each pass
    fns = {("floor", "fwd"): lambda: x.clone(),                                  # read x, write y
           ("floor", "fwd+bwd"): lambda: (x.clone(), torch.add(gy, x))}          # + read g, x, write dx
    for name, f in impls(D).items():
        def fwd(f=f):
            with torch.no_grad():
                f(x, w)

        def fwd_bwd(f=f):
            xg.grad = wg.grad = None
            f(xg, wg).backward(gy)

        fns[(name, "fwd")] = fwd
        fns[(name, "fwd+bwd")] = fwd_bwd
    return best_times(fns, repeats, device, warmup)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="5120x512,2560x768,16384x4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, "
          f"kernels from {ops.load()}")
    print(f"{'shape':>12} {'dtype':>9} {'pass':>8} | {'eager':>8} {'F.rms':>8} {'fused':>8} {'floor':>8} "
          f"| {'eager/fused':>11} {'F/fused':>8} {'fused/floor':>11}   (ms)")
    for shape in a.shapes.split(","):
        N, D = (int(s) for s in shape.lower().split("x"))
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            # the big shape is slow on a CPU: fewer repeats there
            big = N * D > 4_000_000 and a.device == "cpu"
            reps, warmup = (3, 1) if big else (a.repeats, 2)
            t = bench_one(N, D, dtype, a.device, reps, warmup)
            for pass_name in ("fwd", "fwd+bwd"):
                e, fr, fu, fl = (t[(name, pass_name)] for name in ("eager", "F.rms_norm", "fused", "floor"))
                print(f"{shape:>12} {dt:>9} {pass_name:>8} | {e:8.2f} {fr:8.2f} {fu:8.2f} {fl:8.2f} "
                      f"| {e / fu:11.2f} {fr / fu:8.2f} {fu / fl:11.2f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
