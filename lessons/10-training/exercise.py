"""Lesson 10 exercises: the pieces of a training step.

Run `pytest lessons/10-training` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

import torch
from torch import nn

REFERENCE = {
    "lm_loss": "minimind_v.lm:lm_loss",
    "lr_at": "minimind_v.train:lr_at",
    "param_groups": "minimind_v.freeze:param_groups",
    "apply_freeze": "minimind_v.freeze:apply_freeze",
    "epoch_batches": "minimind_v.train:epoch_batches",
}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy with a loss mask.

    logits (B, T, V), labels (B, T) (NOT shifted: labels[t] is the token at position t; -100 where no
    loss is taken). Position t predicts labels[t + 1]: compare logits[:, :-1] with labels[:, 1:],
    in float32, skipping -100, and return the mean over the counted positions (a scalar).
    """
    raise NotImplementedError


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int = 0, min_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup: peak * (step + 1) / warmup_steps for step < warmup_steps. Then a half cosine from the
    peak (at step = warmup_steps) down to min_ratio * peak (at step = total_steps - 1):
        low + (peak - low) * (1 + cos(pi * progress)) / 2,  progress = (step - warmup) / (total - warmup - 1)
    (progress clipped to 1; a span of 0 counts as 1).
    """
    raise NotImplementedError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups over the parameters that require grad:
    [{"params": [tensors with dim >= 2], "weight_decay": weight_decay},
     {"params": [tensors with dim < 2],  "weight_decay": 0.0}].
    Frozen parameters appear in neither; a tied (shared) matrix appears once.
    """
    raise NotImplementedError


def apply_freeze(model: nn.Module, groups) -> list[str]:
    """Make exactly the parameters of `groups` trainable (requires_grad=True), all others frozen.

    For a MiniMindVLM the groups are: "lm" (model.lm), "last_block" (model.lm.layers[-1]),
    "projector" (model.vision_proj), "vision" (model.vision_encoder). A plain MiniMindLM is its own
    "lm" and has no projector or vision encoder (skip those). An unknown group name -> ValueError.
    Returns the names (model.named_parameters()) of the trainable parameters, in order.
    """
    raise NotImplementedError


def epoch_batches(n_items: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches (lists of item indices) for one epoch of data-parallel training.

    Shuffle range(n_items) with a generator seeded by seed + epoch (the same order on every rank and
    every time it is asked: that is what makes resume exact), pad it by repeating its start to a
    multiple of `world`, give rank r the items at positions r, r + world, r + 2*world, ..., and cut
    that into batches of `batch_size` (the last may be shorter).
    """
    raise NotImplementedError
