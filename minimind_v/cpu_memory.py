"""Keeping freed memory for the next training step, on a CPU (Linux, glibc).

By default glibc gives a large block (from 128 KiB; the bar rises with use, up to 32 MiB) a
mapping of its own, unmapped when freed, and trims the free top of its heap. A training step
frees its activations and allocates them again the next step, so each step gets fresh pages, and
the first write to every page is a page fault. Measured on this project's 2-core machines: 3000-5000
faults a step in the demo's SFT, about a tenth of its time; 50,000-170,000 a step (200-700 MB of
fresh pages) for the real 26M LM at B=4 T=640 in float32, whichever model code runs it
(`benchmarks/bench_malloc.py`, `benchmarks/README.md`). With both thresholds raised, freed memory
stays in the heap and the next step reuses it, as PyTorch's CUDA caching allocator does on a GPU.
The process keeps its peak size (a training run reaches it again every step anyway).

`MiniMindLM` calls `keep_freed_memory()` when it is built, so the plain API gets it too, not only
`minimind-v train`. MINIMIND_V_KEEP_FREED_MEMORY=0 in the environment leaves malloc as it is.
"""
from __future__ import annotations

import functools
import os

ENV = "MINIMIND_V_KEEP_FREED_MEMORY"


@functools.cache        # a process-wide setting: every later model built reuses the first answer
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process. Linux with glibc only: elsewhere,
    or with MINIMIND_V_KEEP_FREED_MEMORY=0, nothing changes. Returns whether it applied."""
    import ctypes
    import platform
    if os.environ.get(ENV, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                      # <malloc.h>
    # both: setting either one alone turns off glibc's own adjustment of the other
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
