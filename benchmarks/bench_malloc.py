"""Training-step time with and without `cpu_memory.keep_freed_memory`, in alternating fresh processes.

glibc gives large blocks their own mappings and hands them back to the OS when they are freed,
so every step's activations arrive as fresh pages and each first write is a page fault.
`keep_freed_memory` (called when a `MiniMindLM` is built) raises glibc's mmap and trim thresholds so the
freed memory stays in the heap and the next step reuses it. A malloc setting is global to a
process, so each measurement is a fresh process; the two kinds alternate, and the medians of
their step times and their minor page faults per step are printed with the ratio.

Shapes as in `bench_sft_rows.py`: `demo` (the demo's SFT batches: hidden 128, 2 layers, B=64 x T=28)
and `real` (MiniMind2-V's SFT shape: the real config, B=2 x T=1536).

    python benchmarks/bench_malloc.py --pairs 6
    python benchmarks/bench_malloc.py --shape real --pairs 3 --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def child(shape: str, keep: bool, steps: int, threads: int) -> dict:
    """One process: maybe keep freed memory, build the model and batches, time `steps` steps."""
    import resource
    import time

    import torch

    from minimind_v import cpu_memory
    if keep:
        assert cpu_memory.keep_freed_memory(), "keep_freed_memory did not apply (not Linux with glibc?)"
    else:                                       # building a MiniMindLM would apply it: opt out
        os.environ[cpu_memory.ENV] = "0"
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_sft_rows import build
    from minimind_v.freeze import param_groups
    from minimind_v.train import forward_loss, optimizer_step

    torch.set_num_threads(threads)
    model, batches = build(shape, torch.Generator().manual_seed(0))
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.01, 1.0), lr=1e-3, betas=(0.9, 0.95), fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    cpu = torch.device("cpu")

    def step(i):
        loss, _ = forward_loss(model, batches[i % len(batches)], cpu)
        loss.backward()
        optimizer_step(opt, None, params, 1e-3, 1.0, lambda g: f"gradient norm {g}")

    for i in range(max(2, steps // 5)):                 # warm-up: the allocator reaches its steady state
        step(i)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    seconds = (time.perf_counter() - t) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    return {"ms": seconds * 1e3, "faults": faults}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=("demo", "real"), default="demo")
    p.add_argument("--pairs", type=int, default=6, help="processes of each kind, alternating")
    p.add_argument("--steps", type=int, default=100, help="timed steps per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("keep", "default"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.shape, a.child == "keep", a.steps, a.threads)))
        return 0
    runs = {"default": [], "keep": []}
    for i in range(a.pairs):
        for kind in ("default", "keep") if i % 2 == 0 else ("keep", "default"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--shape", a.shape, "--steps",
                                  str(a.steps), "--threads", str(a.threads)], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {kind:8s} {runs[kind][-1]['ms']:8.2f} ms/step  {runs[kind][-1]['faults']:8.0f} faults/step")
    med = {k: (statistics.median(r["ms"] for r in v), statistics.median(r["faults"] for r in v))
           for k, v in runs.items()}
    print(f"shape {a.shape}, {a.threads} thread(s), {a.pairs} processes each, {a.steps} steps each (medians):")
    print(f"  glibc's defaults     {med['default'][0]:8.2f} ms/step  {med['default'][1]:8.0f} page faults/step")
    print(f"  keep_freed_memory    {med['keep'][0]:8.2f} ms/step  {med['keep'][1]:8.0f} page faults/step")
    print(f"  speedup {med['default'][0] / med['keep'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
