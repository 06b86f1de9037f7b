"""cpu_memory.keep_freed_memory: building a MiniMindLM makes a freed block's pages come back without
page faults (glibc on Linux), and MINIMIND_V_KEEP_FREED_MEMORY=0 leaves malloc as it is."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt only")

# a 64 MB block written and freed, six times, as a training step's activations are: the page
# faults of each write (a fresh mapping faults on each of its 16384 pages of 4 KiB)
CODE = """
import resource, torch
from minimind_v.config import LMConfig
from minimind_v.lm import MiniMindLM
MiniMindLM(LMConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, max_seq_len=16))
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2 ** 20).fill_(2.0); del x
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 16 * 2 ** 20 * 4 // 4096


def writes_without_faults(keep: str) -> int:
    """How many of the last five writes reused freed pages (fewer than 5% of the pages faulted)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIMIND_V_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, check=True, capture_output=True, text=True)
    faults = [int(n) for n in out.stdout.split()]
    return sum(f < PAGES // 20 for f in faults[1:])


def test_a_built_model_keeps_freed_memory_and_the_environment_can_opt_out():
    # kept: the block comes back from the heap (Python's small objects may take a freed block's
    # start once or twice, so a new one is carved before the heap settles)
    assert writes_without_faults("1") >= 3
    assert writes_without_faults("0") == 0          # malloc's defaults: a fresh mapping every time
