"""The reference training script: two stages, freezing, the schedule, DDP, exact resume.

Where it sits: the last step before chat. `data.py` gives batches of token ids, loss masks and
pixels; this module turns them into weight updates and checkpoints that `chat.py` loads.

One optimizer step, read top to bottom in `train()`:

    for each of `accum_steps` micro-batches:            # gradient accumulation
        logits = model(input_ids, pixels | cached features)        # autocast: bf16 / fp16 / fp32
                 (only at the positions that predict a label: the rest would be thrown away)
        loss = cross-entropy on the assistant tokens only (labels -100 elsewhere) / accum_steps
        loss.backward()                                  # DDP averages gradients across ranks here
    grad_norm = clip_grad_norm_(trainable params, grad_clip)
    lr = warmup, then cosine from the peak down to 10% of it
    optimizer.step(); optimizer.zero_grad()

The stages follow MiniMind2-V:
- `pretrain` (image captions): the projector learns to map patch vectors into the LM's
  embedding space, and the last LM block may adapt; everything else is frozen.
- `sft` (questions and answers): the whole LM and the projector learn.
The vision encoder is always frozen, so its output for an image never changes: the optional
feature cache (`features.py`) runs it once per image and every later epoch reads the stored
features instead of running the encoder again.

The pieces this loop uses live beside it: the freeze rules (`freeze.py`), devices, DDP and
precision (`distributed.py`), the checkpoint that makes a resume exact (`train_state.py`), and
the run directory it writes, locked for one run at a time (`rundir.py`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import atomic_save
from .distributed import autocast, rng_state, seed_everything, setup_distributed
from .freeze import FREEZE_RULES, GROUPS, apply_freeze, model_parts, param_groups
from .features import with_feature_cache
from .lm import IGNORE, count_parameters, cross_entropy, loss_positions
from .plots import draw_loss_curve
from .train_state import TrainingError, resume, save_checkpoint
from .rundir import (CHECKPOINT, LOSS_PNG, METRICS, WEIGHTS, RunLock, clean_temp_files, keep_metrics_until,
                     prepare, read_metrics)

# MiniMind2-V's defaults (the real config); the demo passes its own small numbers.
STAGE_DEFAULTS = {
    "pretrain": dict(epochs=4, lr=4e-4, batch_size=16, max_length=640),
    "sft": dict(epochs=2, lr=1e-6, batch_size=4, max_length=1536),
}


def opt(default, help: str, **meta):
    """A TrainConfig field with its command-line help (`minimind-v train` builds its options from these)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    stage: str = opt("pretrain", "pretrain (captions) or sft (conversations)", choices=tuple(STAGE_DEFAULTS))
    epochs: int | None = opt(None, "passes over the data (default: the stage's)")
    lr: float | None = opt(None, "peak learning rate (default: the stage's)")
    batch_size: int | None = opt(None, "samples per process per micro-batch (default: the stage's)")
    max_length: int | None = opt(None, "tokens per sample; longer ones are cut (default: the stage's)")
    accum_steps: int = opt(1, "micro-batches per optimizer step")
    weight_decay: float = opt(0.01, "AdamW weight decay, on matrices only")
    vision_lr_scale: float = opt(1.0, "the vision encoder's lr is the peak lr times this (when it trains)")
    betas: tuple = opt((0.9, 0.95), "AdamW betas, e.g. 0.9,0.95")
    warmup_steps: int = opt(0, "linear warmup steps before the cosine")
    min_lr_ratio: float = opt(0.1, "the cosine ends at this fraction of the peak lr")
    grad_clip: float = opt(1.0, "max global gradient norm (0: no clipping)")
    dtype: str = opt("fp32", "fp32, bf16 (autocast, CPU or CUDA) or fp16 (CUDA, with a GradScaler)",
                     choices=("fp32", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile the model")
    feature_cache: bool = opt(False, "run the frozen encoder once per image and memory-map the features")
    cache_dir: str | None = opt(None, "where the feature cache lives (default OUT/feature_cache); stages may share one")
    trainable: tuple | None = opt(None, "comma-separated groups overriding the stage's rule: " + ", ".join(GROUPS))
    save_every: int = opt(0, "optimizer steps between checkpoints (0: only at the end)")
    log_every: int = opt(10, "optimizer steps between progress lines")
    max_steps: int | None = opt(None, "cap the total steps (the schedule is computed for the capped total)")
    stop_after: int | None = opt(None, "stop after this step as if interrupted (the schedule is unchanged)")
    seed: int = opt(0, "random seed of the shuffle and of dropout")
    num_workers: int = opt(0, "DataLoader worker processes")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    resume: bool = opt(False, "continue from OUT/checkpoint.pt (the schedule may change: --lr, --epochs, ...)")
    overwrite: bool = opt(False, "replace the run already in OUT (its checkpoint, weights and metrics)")
    plot: bool = opt(True, "write loss.png at the end")

    def __post_init__(self):
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be one of {sorted(STAGE_DEFAULTS)}, got {self.stage!r}")
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.trainable is not None:
            self.trainable = tuple(self.trainable)
        at_least = {"epochs": 1, "batch_size": 1, "max_length": 2, "accum_steps": 1, "warmup_steps": 0,
                    "save_every": 0, "log_every": 1, "max_steps": 1, "stop_after": 1, "num_workers": 0}
        for key, low in at_least.items():
            value = getattr(self, key)
            if value is not None and value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")
        checks = {"lr": (self.lr > 0 and math.isfinite(self.lr), "a finite number > 0"),
                  "weight_decay": (0 <= self.weight_decay < math.inf, "a finite number >= 0"),
                  "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "between 0 and 1"),
                  "vision_lr_scale": (0 < self.vision_lr_scale < math.inf, "a finite number > 0"),
                  "grad_clip": (0 <= self.grad_clip < math.inf, "a finite number >= 0 (0: no clipping)"),
                  "betas": (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)")}
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{key} must be {expected}, got {getattr(self, key)!r}")


# ----------------------------------------------------------------------------- precision
def native_bf16(device) -> bool:
    """Whether bfloat16 matrix products run natively on `device`: on CUDA, yes; on a CPU only with
    AVX-512 (or newer) instructions. An AVX2-only CPU emulates them, ~40x slower than float32."""
    if torch.device(device).type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------- the schedule
def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int = 0, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_ratio*peak.

        warmup:  peak * (step + 1) / warmup_steps                     for step < warmup_steps
        cosine:  low + (peak - low) * (1 + cos(pi * progress)) / 2     progress 0 -> 1
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    low = peak * min_ratio
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- one micro-batch
def forward_loss(model, batch: dict, device: torch.device):
    """(loss, tokens in the batch). A VLM gets pixels, or its cached encoder features."""
    input_ids = batch["input_ids"].to(device)          # (B, T)
    labels = batch["labels"].to(device)                # (B, T), -100 where no loss is taken
    kwargs = {}
    if batch.get("image_features") is not None:
        kwargs["image_features"] = batch["image_features"].to(device)              # (B, N, P, Dv)
    elif batch.get("pixel_values") is not None:
        kwargs["pixel_values"] = batch["pixel_values"].to(device)                  # (B, N, 3, S, S)
    # logits only where a label is taken (the same loss as lm_loss on all logits, less work)
    logits_at, targets = loss_positions(labels)        # (B, T) bool, (K,)
    index = logits_at.flatten().nonzero()[:, 0]        # (K,) flat positions: a gather torch.compile traces
    logits = model(input_ids, logits_at=index, **kwargs)        # (K, V)
    loss = cross_entropy(logits, targets)             # F.cross_entropy(logits.float(), targets), less traffic
    aux = getattr(getattr(model, "module", model), "aux_loss", None)     # MoE load balancing (DDP: .module)
    if aux is not None:
        loss = loss + aux
    return loss, input_ids.numel()


def step_work(batch: dict, work: dict | None) -> dict:
    """Add a micro-batch's work to the step's counts (for throughput and FLOPs, see `report.py`):
    tokens (B*T, padding included), rows, attention pairs (B*T^2), answer positions, images."""
    B, T = batch["input_ids"].shape
    n_img = int(batch["image_counts"].sum()) if batch.get("image_counts") is not None else 0
    n_lab = int((batch["labels"] != IGNORE).sum()) if batch.get("labels") is not None else 0
    work = work or {"tokens": 0, "rows": 0, "pairs": 0, "targets": 0, "images": 0}
    for k, v in (("tokens", B * T), ("rows", B), ("pairs", B * T * T), ("targets", n_lab), ("images", n_img)):
        work[k] += v
    return work


def optimizer_step(optimizer, scaler, params, lr: float, grad_clip: float, diverged) -> torch.Tensor:
    """Clip the gradients, set the lr, step, zero the gradients; returns the gradient norm.

    A non-finite norm stops the run (`diverged(norm)` words the message) unless fp16's GradScaler
    is on, which skips such a step by itself and lowers its scale.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
    if scaler is None and not torch.isfinite(grad_norm):
        raise TrainingError(diverged(grad_norm))
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------- progress
def format_progress(step, total, loss, lr, grad_norm, tokens_per_s, eta_s) -> str:
    eta = f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    return (f"step {step:>{len(str(total))}}/{total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"grad {grad_norm:.3f}  {tokens_per_s:,.0f} tok/s  eta {eta}")


# ----------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    steps: list = field(default_factory=list)      # optimizer steps run in this call (1-based)
    losses: list = field(default_factory=list)     # their losses (mean over the micro-batches)
    final_step: int = 0
    total_steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def epoch_batches(n_items: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch: a fixed shuffle per (seed, epoch), split across ranks.

    DistributedSampler gives rank r the items r, r+world, ... of the shuffled order (padding by
    repetition so every rank has as many), so ranks' batch b together cover the global batch b.
    """
    sampler = DistributedSampler(range(n_items), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train(model: nn.Module, dataset, collate, tcfg: TrainConfig, out_dir, log=print,
          on_step=None) -> TrainResult:
    """Train `model` on `dataset` under `tcfg`, writing checkpoints and metrics to `out_dir`.

    The caller builds the model (and writes config.json, see `rundir.write_config`); a VLM's
    frozen encoder (`model.image_features`) fills the feature cache when `tcfg.feature_cache`.
    `on_step(step, loss)` is called after every optimizer step (e.g. to evaluate now and then).
    The directory is locked for the run (`rundir.RunLock`); an existing run in it is continued
    only with `resume` and replaced only with `overwrite` (`rundir.prepare`).
    """
    rank = int(os.environ.get("RANK", "0"))
    with RunLock(out_dir, log) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            prepare(out_dir, tcfg.resume, tcfg.overwrite, log)
            clean_temp_files(out_dir, log)
        return _train(model, dataset, collate, tcfg, Path(out_dir), log, on_step)


def _train(model, dataset, collate, tcfg: TrainConfig, out_dir: Path, log, on_step) -> TrainResult:
    rank, world, device = setup_distributed(tcfg.device)
    is_main = rank == 0
    if not is_main:
        log = lambda *a, **k: None                          # noqa: E731  (rank-0 logging)

    # -- what learns
    groups = tcfg.trainable if tcfg.trainable is not None else FREEZE_RULES[tcfg.stage]
    trainable = apply_freeze(model, groups)
    if not trainable:
        raise ValueError(f"nothing to train: groups {groups} match no parameter of the model")
    present = [g for g in groups if g in model_parts(model)]
    log(f"stage {tcfg.stage}: training {', '.join(present)} -> {count_parameters(model, trainable_only=True):,} "
        f"of {count_parameters(model):,} parameters")
    model.to(device)
    parts = model_parts(model)

    # -- optimizer, precision
    # fused: one kernel updates every tensor of a group (the same rule as the for-loop AdamW)
    optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay, tcfg.vision_lr_scale), lr=tcfg.lr, betas=tcfg.betas,
                                  fused=True)
    scaler = torch.amp.GradScaler("cuda") if tcfg.dtype == "fp16" else None
    if tcfg.dtype == "bf16" and not native_bf16(device):
        log(f"warning: dtype bf16 on a CPU without native bfloat16 ({torch.backends.cpu.get_cpu_capability()}): "
            f"its matrix products are emulated, many times slower than fp32; expected --dtype fp32 here")
    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile:
        train_model = torch.compile(train_model)

    # -- how long: a step is accum_steps micro-batches; leftovers at an epoch's end are dropped
    micro_per_epoch = len(epoch_batches(len(dataset), tcfg.batch_size, 0, tcfg.seed, rank, world))
    steps_per_epoch = micro_per_epoch // tcfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples make no full step of {tcfg.accum_steps} x "
                         f"{tcfg.batch_size} x {world} samples")
    total = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total = min(total, tcfg.max_steps)

    # -- resume (before the feature cache: the cache must come from the checkpoint's encoder)
    step, metrics_path = 0, out_dir / METRICS
    seed_everything(tcfg.seed + rank)                      # dropout etc.; model init is the caller's
    ckpt_path = out_dir / CHECKPOINT
    if tcfg.resume:
        step = resume(ckpt_path, model, optimizer, scaler, tcfg, world, rank, device, log)
        log(f"resumed from {ckpt_path} at step {step}/{total}")
        if is_main:
            keep_metrics_until(metrics_path, step)
    last_saved = step if tcfg.resume else None

    # -- the vision-feature cache (only valid while the encoder is frozen)
    if tcfg.feature_cache and hasattr(model, "image_features"):
        if "vision" in groups:
            raise ValueError("the feature cache needs a frozen vision encoder (drop 'vision' from trainable)")
        folder = Path(tcfg.cache_dir) if tcfg.cache_dir else out_dir / "feature_cache"
        dataset, collate = with_feature_cache(model, dataset, collate, folder, is_main, world, log)

    def checkpoint(now_step):
        nonlocal last_saved
        states = [rng_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if is_main:
            progress = {"step": now_step, "epoch": now_step // steps_per_epoch,
                        "batch": (now_step % steps_per_epoch) * tcfg.accum_steps, "total_steps": total,
                        "world_size": world}
            save_checkpoint(out_dir, model, optimizer, scaler, progress, states, tcfg)
        last_saved = now_step

    # -- the loop
    result = TrainResult(total_steps=total)
    train_model.train()
    if "vision" in parts:
        parts["vision"].eval()
    params = [p for p in model.parameters() if p.requires_grad]
    t_start = t_log = time.time()
    tokens_since_log, steps_this_run = 0, 0
    metrics = open(metrics_path, "a") if is_main else None
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            batches = epoch_batches(len(dataset), tcfg.batch_size, epoch, tcfg.seed, rank, world)
            start = in_epoch * tcfg.accum_steps
            batches = batches[start:steps_per_epoch * tcfg.accum_steps]
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=tcfg.num_workers)
            micro = 0
            step_loss = torch.zeros((), device=device)
            work = None
            for batch in loader:
                lr = lr_at(step, total, tcfg.lr, tcfg.warmup_steps, tcfg.min_lr_ratio)
                last_micro = (micro + 1) % tcfg.accum_steps == 0
                sync = train_model.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext()
                with sync:
                    with autocast(device, tcfg.dtype):
                        loss, n_tok = forward_loss(train_model, batch, device)
                    if not torch.isfinite(loss):
                        raise TrainingError(_diverged_message("loss", loss, step + 1, epoch, start + micro,
                                                              last_saved, ckpt_path))
                    scaled = loss / tcfg.accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += scaled.detach()
                tokens_since_log += n_tok * world
                work = step_work(batch, work)
                micro += 1
                if not last_micro:
                    continue
                # -- the optimizer step
                grad_norm = optimizer_step(optimizer, scaler, params, lr, tcfg.grad_clip,
                                           lambda g: _diverged_message("gradient norm", g, step + 1, epoch,
                                                                       start + micro - 1, last_saved, ckpt_path))
                if world > 1:
                    dist.all_reduce(step_loss, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
                    if device.type != "cuda":
                        step_loss /= world
                step += 1
                steps_this_run += 1
                loss_value = float(step_loss)
                step_loss = torch.zeros((), device=device)
                result.steps.append(step)
                result.losses.append(loss_value)
                if is_main:
                    metrics.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                                              "grad_norm": float(grad_norm), "time": time.time() - t_start,
                                              **{k: v * world for k, v in work.items()}}) + "\n")
                    metrics.flush()
                if step % tcfg.log_every == 0 or step == total:
                    now = time.time()
                    eta = (now - t_start) / steps_this_run * (total - step)
                    log(format_progress(step, total, loss_value, lr, float(grad_norm),
                                        tokens_since_log / max(now - t_log, 1e-9), eta))
                    t_log, tokens_since_log = now, 0
                if on_step is not None:
                    on_step(step, loss_value)
                if tcfg.save_every and step % tcfg.save_every == 0 and step < total:
                    checkpoint(step)
                if tcfg.stop_after is not None and step >= tcfg.stop_after and step < total:
                    result.stopped_early = True
                    break
                if step >= total:                          # max_steps may end mid-epoch
                    break
                micro, work = 0, None
            if result.stopped_early:
                break
        if not result.stopped_early:
            checkpoint(step)
            if is_main:
                atomic_save(model.state_dict(), out_dir / WEIGHTS)
    finally:
        if metrics is not None:
            metrics.close()
    result.final_step = step
    result.seconds = time.time() - t_start
    if is_main and tcfg.plot and not result.stopped_early:
        rows = read_metrics(metrics_path)
        draw_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], out_dir / LOSS_PNG,
                        f"{tcfg.stage} loss")
    if world > 1:
        dist.barrier()          # every rank returns once rank 0's weights and plot are on disk, and together
    log(f"{'stopped' if result.stopped_early else 'done'} at step {step}/{total} in {result.seconds:.1f}s"
        f" -> {out_dir}")
    return result


def _diverged_message(what, value, step, epoch, batch, last_saved, ckpt_path) -> str:
    keep = (f"the last good checkpoint is {ckpt_path} (step {last_saved}); continue from it with a lower "
            f"peak lr: the same command with --resume --lr X" if last_saved is not None
            else "no checkpoint was written yet (--save-every N writes them); start again with a lower --lr")
    return (f"{what} is {float(value.detach())} at step {step} (epoch {epoch}, batch {batch}): training stopped; "
            f"{keep}")
