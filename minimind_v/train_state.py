"""The full training state: saved in one atomic file, restored for an exact resume.

Where it sits: inside `train`'s loop (`save_checkpoint` every `save_every` steps and at the end)
and at its start (`resume`). `checkpoint.pt` holds everything needed to continue exactly: the
weights (frozen parts too), the optimizer moments, the GradScaler, the progress (step, epoch, batch;
the schedule is a function of the step, the shuffled order of an epoch a function of the seed and
the epoch), the RNG states of every rank, and the run's TrainConfig. A resume checks that the run
is the same run (stage, batch size, accumulation, seed, process count) and says what it changes
on purpose (the learning-rate schedule), then restores it all; on CPU the continued run's losses
equal an uninterrupted run's bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from .checkpoint import atomic_save, load_state_dict
from .distributed import set_rng_state
from .rundir import CHECKPOINT


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit this run)."""


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer, scaler, progress: dict,
                    rng: list[dict], tcfg) -> None:
    """One atomic file with everything a resume needs (model weights include frozen parts)."""
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "progress": progress, "rng": rng, "train_config": _jsonable(dataclasses.asdict(tcfg))},
                out_dir / CHECKPOINT)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


# what a resume may change on purpose (the learning-rate schedule); everything else must match
RESUME_MAY_CHANGE = ("lr", "warmup_steps", "min_lr_ratio", "epochs", "max_steps", "vision_lr_scale")
RESUME_MUST_MATCH = ("stage", "batch_size", "accum_steps", "seed")


def resume(path: Path, model, optimizer, scaler, tcfg, world: int, rank: int, device, log) -> int:
    """Load the full training state of `path` into the model, optimizer and RNGs; returns the step."""
    ckpt = load_state_dict(path, map_location=device)
    saved = ckpt["train_config"]
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != getattr(tcfg, key):
            raise TrainingError(f"{path}: was written with {key}={saved.get(key)!r}, this run has "
                                f"{key}={getattr(tcfg, key)!r}; resume with the same {key}")
    if ckpt["progress"]["world_size"] != world:
        raise TrainingError(f"{path}: was written by {ckpt['progress']['world_size']} processes, "
                            f"this run has {world}")
    for key in RESUME_MAY_CHANGE:
        if saved.get(key) != getattr(tcfg, key):
            log(f"resume: {key} changed from {saved.get(key)!r} to {getattr(tcfg, key)!r}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:                   # this run's scale, not the saved one
        group["lr_scale"] = tcfg.vision_lr_scale if group.get("vision") else 1.0
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank])
    return ckpt["progress"]["step"]
