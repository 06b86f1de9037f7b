"""Where a training run executes: the device, the processes of a DDP run, the precision, the RNG states.

Where it sits: under `train.py`. Under `torchrun` (WORLD_SIZE > 1) every process runs the same
loop on its share of each batch; DDP averages the gradients. Exact resume needs every random
number generator a run uses (torch, CUDA, Python, NumPy) saved with the checkpoint and restored.
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def autocast(device: torch.device, dtype: str):
    """The forward pass's precision. fp32: no autocast. Weights and optimizer stay fp32 always."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA (on CPU use bf16)")
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- RNG states
def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
