"""Fused RMSNorm (kernels/, minimind_v.ops) vs eager `rms_norm` and `F.rms_norm`, in one run.

For each shape and dtype it times forward and forward+backward, plus a memory floor measured in
the same run: the plainest torch ops that allocate and move the same bytes as the fused op,
    forward          reads x, writes a new y              floor: x.clone()
    forward+backward + reads grad_y and x, writes new dx  floor: x.clone() and torch.add(grad_y, x)
(the weight, rstd and dw are one value per column or row: negligible). Prints milliseconds
(best of the repeats) and the ratios  eager / fused,  F.rms_norm / fused,  fused / floor.

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


def timeit(fn, repeats: int, device: str, warmup: int = 2) -> float:
    """Best (minimum) wall time of fn() in milliseconds, after `warmup` calls.

    The minimum, not the mean: on a machine shared with other work, the noise only ever adds time.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def impls(D):
    return {
        "eager": lambda x, w: rms_norm(x, w, EPS),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (D,), w, EPS),
        "fused": lambda x, w: ops.fused_rms_norm(x, w, EPS),
    }


def bench_one(N, D, dtype, device, repeats, warmup):
    x = torch.randn(N, D, device=device, dtype=dtype)
    w = (torch.rand(D, device=device) + 0.5).to(dtype)
    gy = torch.randn(N, D, device=device, dtype=dtype)
    # the floor: the plainest torch ops that allocate and move the same bytes as each pass
    floor_fwd = timeit(lambda: x.clone(), repeats, device, warmup)                        # read x, write y
    floor_fwd_bwd = timeit(lambda: (x.clone(), torch.add(gy, x)), repeats, device, warmup)  # + read g, x, write dx
    rows = {}
    for name, f in impls(D).items():
        with torch.no_grad():
            fwd = timeit(lambda: f(x, w), repeats, device, warmup)
        xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

        def fwd_bwd():
            xg.grad = wg.grad = None
            f(xg, wg).backward(gy)

        rows[name] = (fwd, timeit(fwd_bwd, repeats, device, warmup))
    return (floor_fwd, floor_fwd_bwd), rows


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
          f"kernels from {ops.BUILD_DIR}")
    print(f"{'shape':>12} {'dtype':>9} {'pass':>8} | {'eager':>8} {'F.rms':>8} {'fused':>8} {'floor':>8} "
          f"| {'eager/fused':>11} {'F/fused':>8} {'fused/floor':>11}   (ms)")
    for shape in a.shapes.split(","):
        N, D = (int(s) for s in shape.lower().split("x"))
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            # the big shape is slow on a CPU: fewer repeats there
            big = N * D > 4_000_000 and a.device == "cpu"
            reps, warmup = (3, 1) if big else (a.repeats, 2)
            floors, rows = bench_one(N, D, dtype, a.device, reps, warmup)
            for i, (pass_name, floor) in enumerate(zip(("fwd", "fwd+bwd"), floors)):
                e, fr, fu = rows["eager"][i], rows["F.rms_norm"][i], rows["fused"][i]
                print(f"{shape:>12} {dt:>9} {pass_name:>8} | {e:8.2f} {fr:8.2f} {fu:8.2f} {floor:8.2f} "
                      f"| {e / fu:11.2f} {fr / fu:8.2f} {fu / floor:11.2f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
