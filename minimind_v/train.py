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
feature cache runs it once per image, stores the features in a memory-mapped `.npy` file, and
every later epoch reads them instead of running the encoder again.

Checkpoints are atomic (written to a temp file, then renamed) and hold everything needed to
continue exactly: weights, optimizer moments, the step (the schedule is a function of it), the
RNG states of every rank, and the data position (epoch and batch; the shuffled order of an
epoch is a function of the seed and the epoch). An interrupted run that resumes produces the
same losses, bit for bit on CPU, as one that never stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import atomic_save, load_state_dict
from .lm import loss_positions

CHECKPOINT = "checkpoint.pt"      # full training state, for resuming
WEIGHTS = "model.pt"              # final weights only, for chat and the next stage
CONFIG = "config.json"            # model config + how the directory was made
METRICS = "metrics.jsonl"         # one line per optimizer step
LOSS_PNG = "loss.png"
TOKENIZER = "tokenizer.model"

# MiniMind2-V's defaults (the real config); the demo passes its own small numbers.
STAGE_DEFAULTS = {
    "pretrain": dict(epochs=4, lr=4e-4, batch_size=16, max_length=640),
    "sft": dict(epochs=2, lr=1e-6, batch_size=4, max_length=1536),
}
# Which parts learn in each stage (vision is never in a default rule).
FREEZE_RULES = {
    "pretrain": ("projector", "last_block"),
    "sft": ("lm", "projector"),
}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit this run)."""


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    epochs: int | None = None         # None: the stage default
    lr: float | None = None           # peak learning rate
    batch_size: int | None = None     # per process, per micro-batch
    max_length: int | None = None     # used by whoever builds the dataset
    accum_steps: int = 1              # micro-batches per optimizer step
    weight_decay: float = 0.01        # on matrices only (see `param_groups`)
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1         # cosine ends at min_lr_ratio * lr
    grad_clip: float = 1.0            # max global grad norm (0 = no clipping)
    dtype: str = "fp32"               # "fp32" | "bf16" (autocast, CPU or CUDA) | "fp16" (CUDA, GradScaler)
    compile: bool = False             # torch.compile the model
    feature_cache: bool = False       # run the frozen encoder once per image, memory-map the features
    cache_dir: str | None = None      # where (default out_dir/feature_cache); stages may share one
    trainable: tuple | None = None    # override the stage's freeze rule, e.g. ("projector",)
    save_every: int = 0               # optimizer steps between checkpoints (0: only at the end)
    log_every: int = 10
    max_steps: int | None = None      # cap the total (the schedule is computed for the capped total)
    stop_after: int | None = None     # stop after this step as if interrupted (schedule unchanged)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"              # "auto": cuda:LOCAL_RANK if available, else cpu
    resume: bool = False              # continue from out_dir/checkpoint.pt if there is one
    plot: bool = True                 # write loss.png at the end

    def __post_init__(self):
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be one of {sorted(STAGE_DEFAULTS)}, got {self.stage!r}")
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        self.betas = tuple(self.betas)
        if self.trainable is not None:
            self.trainable = tuple(self.trainable)


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


# ----------------------------------------------------------------------------- freezing
def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The named parts a freeze rule can switch on: lm, last_block, projector, vision.

    A plain `MiniMindLM` is its own `lm` (it has no projector or vision encoder).
    """
    lm = getattr(model, "lm", model)
    parts = {"lm": lm, "last_block": lm.layers[-1]}
    if hasattr(model, "vision_proj"):
        parts["projector"] = model.vision_proj
    if hasattr(model, "vision_encoder"):
        parts["vision"] = model.vision_encoder
    return parts


def apply_freeze(model: nn.Module, groups) -> list[str]:
    """requires_grad=True exactly on the parameters of `groups`; returns the trainable names.

    Parts the model does not have are skipped (a text-only LM has no projector).
    """
    parts = model_parts(model)
    unknown = [g for g in groups if g not in ("lm", "last_block", "projector", "vision")]
    if unknown:
        raise ValueError(f"unknown trainable group(s) {unknown}; choose from lm, last_block, projector, vision")
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        if g in parts:
            for p in parts[g].parameters():
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (linear weights, embeddings); never norms' gains or biases.

    Decaying a norm gain pulls it towards 0, which shrinks the whole layer's output; the usual
    rule (GPT-2, Llama) is to decay only tensors with 2 or more dimensions.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():          # a tied matrix appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- devices, DDP, precision
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


# ----------------------------------------------------------------------------- vision-feature cache
class FeatureCache:
    """Frozen-encoder features of every image, computed once and memory-mapped.

    `features.f32` holds an (n_images, P, D_vision) float32 array, row after row, read back with
    `np.memmap` (the OS pages in only the rows a batch touches, so the cache can be far larger
    than memory); `features.json` gives its shape, the image paths in row order, and a
    fingerprint of the encoder weights, so a cache built by another encoder is rebuilt rather
    than trusted. Building streams: one pass over the dataset, `batch_size` new images at a time.
    """

    def __init__(self, folder: Path):
        meta = json.loads((folder / "features.json").read_text())
        self.row = {p: i for i, p in enumerate(meta["paths"])}
        self.fingerprint = meta["fingerprint"]
        self.array = np.memmap(folder / "features.f32", dtype=np.float32, mode="r",
                               shape=tuple(meta["shape"]))                 # (n, P, Dv)

    @staticmethod
    def fingerprint_of(encoder: nn.Module) -> str:
        h = hashlib.sha1()
        for name, t in sorted(encoder.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def build(cls, folder: Path, encode, dataset, fingerprint: str, batch_size: int = 64,
              log=print) -> "FeatureCache":
        """Run `encode(pixels (n,3,S,S)) -> (n, P, Dv)` once per distinct image of `dataset`."""
        folder.mkdir(parents=True, exist_ok=True)
        meta_file = folder / "features.json"
        if meta_file.is_file():
            cache = cls(folder)
            wanted = {str(p) for _, _, paths in getattr(dataset, "samples", []) for p in paths}
            if cache.fingerprint == fingerprint and wanted <= cache.row.keys():
                log(f"feature cache: reusing {folder} ({len(cache.row)} images)")
                return cache
            meta_file.unlink()                        # another encoder or other images: rebuild
        t0 = time.time()
        seen, pending, shape = {}, [], None           # path -> row; (path, pixels) waiting to be encoded
        tmp = folder / "features.f32.tmp"
        with open(tmp, "wb") as f:
            def flush():
                nonlocal shape
                with torch.no_grad():
                    feats = encode(torch.stack([pix for _, pix in pending])).float().cpu().numpy()  # (n, P, Dv)
                f.write(np.ascontiguousarray(feats).tobytes())
                shape = feats.shape[1:]
                pending.clear()

            for i in range(len(dataset)):
                item = dataset[i]
                for path, pix in zip(item["image_paths"], item["pixel_values"]):
                    if path not in seen:
                        seen[path] = len(seen)
                        pending.append((path, pix))
                if len(pending) >= batch_size:
                    flush()
            if pending:
                flush()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / "features.f32")
        meta_tmp = folder / "features.json.tmp"
        meta_tmp.write_text(json.dumps({"paths": list(seen), "shape": [len(seen), *shape],
                                        "fingerprint": fingerprint}))
        os.replace(meta_tmp, meta_file)               # written last: its presence means complete
        log(f"feature cache: encoded {len(seen)} images once in {time.time() - t0:.1f}s -> {folder}")
        return cls(folder)

    def lookup(self, image_paths: list[list[str]]) -> torch.Tensor:
        """Per-sample lists of image paths -> (B, Nmax, P, Dv) features (zeros where a row has fewer)."""
        B, n_max = len(image_paths), max((len(p) for p in image_paths), default=0)
        out = np.zeros((B, n_max, *self.array.shape[1:]), dtype=np.float32)
        for b, paths in enumerate(image_paths):
            for n, p in enumerate(paths):
                out[b, n] = self.array[self.row[p]]
        return torch.from_numpy(out)


# ----------------------------------------------------------------------------- one micro-batch
def forward_loss(model, batch: dict, device: torch.device, cache: FeatureCache | None = None):
    """(loss, tokens in the batch). A VLM gets pixels, or its cached encoder features."""
    input_ids = batch["input_ids"].to(device)          # (B, T)
    labels = batch["labels"].to(device)                # (B, T), -100 where no loss is taken
    kwargs = {}
    if cache is not None and batch.get("image_paths") is not None:
        kwargs["image_features"] = cache.lookup(batch["image_paths"]).to(device)   # (B, N, P, Dv)
    elif batch.get("pixel_values") is not None:
        kwargs["pixel_values"] = batch["pixel_values"].to(device)                  # (B, N, 3, S, S)
    # logits only where a label is taken (the same loss as lm_loss on all logits, less work)
    logits_at, targets = loss_positions(labels)        # (B, T) bool, (K,)
    logits = model(input_ids, logits_at=logits_at, **kwargs)    # (K, V)
    return F.cross_entropy(logits.float(), targets), input_ids.numel()


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(out_dir: Path, model: nn.Module, optimizer, scaler, progress: dict,
                    rng: list[dict], tcfg: TrainConfig) -> None:
    """One atomic file with everything a resume needs (model weights include frozen parts)."""
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "progress": progress, "rng": rng, "train_config": _jsonable(dataclasses.asdict(tcfg))},
                out_dir / CHECKPOINT)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint directory (no {CONFIG})")
    return json.loads(path.read_text())


def load_weights(ckpt_dir: str | os.PathLike) -> dict:
    """The model state dict of a checkpoint directory: model.pt, or the latest checkpoint.pt."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS).is_file():
        return load_state_dict(ckpt_dir / WEIGHTS)
    if (ckpt_dir / CHECKPOINT).is_file():
        return load_state_dict(ckpt_dir / CHECKPOINT)["model"]
    raise FileNotFoundError(f"{ckpt_dir}: no {WEIGHTS} or {CHECKPOINT}")


# ----------------------------------------------------------------------------- progress
def format_progress(step, total, loss, lr, grad_norm, tokens_per_s, eta_s) -> str:
    eta = f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    return (f"step {step:>{len(str(total))}}/{total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"grad {grad_norm:.3f}  {tokens_per_s:,.0f} tok/s  eta {eta}")


def draw_loss_curve(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> None:
    """A small line chart with Pillow (a runtime dependency; no matplotlib needed)."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 640, 400, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 8), title, fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if finite:
        s0, s1 = finite[0][0], max(finite[-1][0], finite[0][0] + 1)
        lo, hi = min(v for _, v in finite), max(v for _, v in finite)
        hi = hi if hi > lo else lo + 1.0
        sx = lambda s: L + (W - R - L) * (s - s0) / (s1 - s0)
        sy = lambda v: H - B - (H - B - T) * (v - lo) / (hi - lo)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            d.text((4, sy(v) - 6), f"{v:.3g}", fill="black")
            d.line([L - 4, sy(v), L, sy(v)], fill="black")
        d.text((L, H - B + 6), str(s0), fill="black")
        d.text((W - R - 40, H - B + 6), str(s1), fill="black")
        d.text(((W - 30) // 2, H - B + 20), "step", fill="black")
        d.line([(sx(s), sy(v)) for s, v in finite] if len(finite) > 1 else [(sx(s0), sy(finite[0][1]))] * 2,
               fill=(31, 119, 180), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


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
          encoder=None, on_step=None) -> TrainResult:
    """Train `model` on `dataset` under `tcfg`, writing checkpoints and metrics to `out_dir`.

    The caller builds the model (and writes config.json, see `write_config`); `encoder` is the
    frozen vision encoder's feature function for the feature cache (`model.image_features`).
    `on_step(step, loss)` is called after every optimizer step (e.g. to evaluate now and then).
    """
    out_dir = Path(out_dir)
    rank, world, device = setup_distributed(tcfg.device)
    is_main = rank == 0
    if not is_main:
        log = lambda *a, **k: None                          # noqa: E731  (rank-0 logging)
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- what learns
    groups = tcfg.trainable if tcfg.trainable is not None else FREEZE_RULES[tcfg.stage]
    trainable = apply_freeze(model, groups)
    if not trainable:
        raise ValueError(f"nothing to train: groups {groups} match no parameter of the model")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    present = [g for g in groups if g in model_parts(model)]
    log(f"stage {tcfg.stage}: training {', '.join(present)} -> {n_train:,} of {n_all:,} parameters")
    model.to(device)
    parts = model_parts(model)
    if "vision" in parts:
        parts["vision"].eval()                              # frozen: no dropout, fixed statistics

    # -- the vision-feature cache (only valid while the encoder is frozen)
    cache = None
    if tcfg.feature_cache and encoder is not None:
        if "vision" in groups:
            raise ValueError("the feature cache needs a frozen vision encoder (drop 'vision' from trainable)")
        folder = Path(tcfg.cache_dir) if tcfg.cache_dir else out_dir / "feature_cache"
        fp = FeatureCache.fingerprint_of(parts["vision"]) if "vision" in parts else "none"
        if is_main:
            FeatureCache.build(folder, encoder, dataset, fp, log=log)
        if world > 1:
            dist.barrier()
        cache = FeatureCache(folder)
    had_pixels = getattr(dataset, "load_pixels", None)
    if cache is not None and had_pixels is not None:
        dataset.load_pixels = False                       # items: ids, labels, image paths only

    # -- optimizer, precision
    optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=tcfg.betas,
                                  foreach=False)
    scaler = torch.amp.GradScaler("cuda") if tcfg.dtype == "fp16" else None
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

    # -- resume
    step, metrics_path = 0, out_dir / METRICS
    torch.manual_seed(tcfg.seed + rank)                    # dropout etc.; model init is the caller's
    random.seed(tcfg.seed + rank)
    np.random.seed(tcfg.seed + rank)
    ckpt_path = out_dir / CHECKPOINT
    if tcfg.resume and ckpt_path.is_file():
        ckpt = load_state_dict(ckpt_path, map_location=device)
        _check_resumable(ckpt, tcfg, world, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["progress"]["step"]
        set_rng_state(ckpt["rng"][rank])
        log(f"resumed from {ckpt_path} at step {step}/{total}")
        if is_main and metrics_path.is_file():            # drop lines written after that checkpoint
            lines = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
    elif is_main and metrics_path.is_file():
        metrics_path.unlink()
    last_saved = step if ckpt_path.is_file() and tcfg.resume else None

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
            for batch in loader:
                lr = lr_at(step, total, tcfg.lr, tcfg.warmup_steps, tcfg.min_lr_ratio)
                last_micro = (micro + 1) % tcfg.accum_steps == 0
                sync = train_model.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext()
                with sync:
                    with autocast(device, tcfg.dtype):
                        loss, n_tok = forward_loss(train_model, batch, device, cache)
                    if not torch.isfinite(loss):
                        raise TrainingError(_diverged_message("loss", loss, step + 1, epoch, start + micro,
                                                              last_saved, ckpt_path))
                    scaled = loss / tcfg.accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += scaled.detach()
                tokens_since_log += n_tok * world
                micro += 1
                if not last_micro:
                    continue
                # -- the optimizer step
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if tcfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                else:
                    grad_norm = torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
                if scaler is None and not torch.isfinite(grad_norm):
                    raise TrainingError(_diverged_message("gradient norm", grad_norm, step + 1, epoch,
                                                          start + micro - 1, last_saved, ckpt_path))
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
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
                                              "grad_norm": float(grad_norm), "time": time.time() - t_start}) + "\n")
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
                micro = 0
            if result.stopped_early:
                break
        if not result.stopped_early:
            checkpoint(step)
            if is_main:
                atomic_save(model.state_dict(), out_dir / WEIGHTS)
    finally:
        if metrics is not None:
            metrics.close()
        if had_pixels is not None:
            dataset.load_pixels = had_pixels
    result.final_step = step
    result.seconds = time.time() - t_start
    if is_main and tcfg.plot and not result.stopped_early:
        rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines()]
        draw_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], out_dir / LOSS_PNG,
                        f"{tcfg.stage} loss")
    log(f"{'stopped' if result.stopped_early else 'done'} at step {step}/{total} in {result.seconds:.1f}s"
        f" -> {out_dir}")
    return result


def _diverged_message(what, value, step, epoch, batch, last_saved, ckpt_path) -> str:
    keep = (f"the last good checkpoint is {ckpt_path} (step {last_saved}); resume from it with a lower lr"
            if last_saved is not None else "no checkpoint was written yet")
    return (f"{what} is {float(value.detach())} at step {step} (epoch {epoch}, batch {batch}): training stopped; "
            f"{keep}")


def _check_resumable(ckpt: dict, tcfg: TrainConfig, world: int, path: Path) -> None:
    saved = ckpt["train_config"]
    for key in ("stage", "epochs", "lr", "batch_size", "accum_steps", "seed", "max_steps", "warmup_steps"):
        if saved.get(key) != getattr(tcfg, key):
            raise TrainingError(f"{path}: was written with {key}={saved.get(key)!r}, this run has "
                                f"{key}={getattr(tcfg, key)!r}; resume with the same settings")
    if ckpt["progress"]["world_size"] != world:
        raise TrainingError(f"{path}: was written by {ckpt['progress']['world_size']} processes, "
                            f"this run has {world}")


# ----------------------------------------------------------------------------- building models
def write_config(out_dir, model_cfg, stage: str, tokenizer_file=None, **extra) -> None:
    """config.json: the model config and kind, so `chat` can rebuild the model; copies the tokenizer."""
    from .config import LMConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"kind": "lm" if isinstance(model_cfg, LMConfig) else "vlm", "model_config": model_cfg.to_dict(),
            "stage": stage, **extra}
    if tokenizer_file is not None:
        if Path(tokenizer_file).resolve() != (out_dir / TOKENIZER).resolve():
            shutil.copyfile(tokenizer_file, out_dir / TOKENIZER)
        info["tokenizer"] = TOKENIZER
    tmp = out_dir / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out_dir / CONFIG)


def model_from_config(info: dict):
    """config.json contents -> an untrained model of that shape."""
    from .config import LMConfig, VLMConfig

    if info["kind"] == "lm":
        from .lm import MiniMindLM
        return MiniMindLM(LMConfig(**info["model_config"]))
    from .vlm import MiniMindVLM
    return MiniMindVLM(VLMConfig(**info["model_config"]))


def load_model(ckpt_dir, device="cpu"):
    """A checkpoint directory -> (model in eval mode, config.json contents)."""
    info = read_config(ckpt_dir)
    model = model_from_config(info)
    from .checkpoint import strict_load
    strict_load(model, load_weights(ckpt_dir), str(ckpt_dir))
    return model.to(device).eval(), info


def initialise(model, init: str | None, clip: str | None = None, log=print) -> None:
    """Load starting weights into `model` (a MiniMindVLM, or a MiniMindLM).

    init, by what it is:
    - a checkpoint directory of ours (a previous stage): every weight;
    - a `.pt`/`.pth` state dict with our names: the whole model (VLM names `lm.*`, `vision_proj.*`,
      ...) or only the language model (our LM's `model.pt`);
    - an upstream MiniMind LLM `.pth` (`model.layers.*` names): the language model; an upstream
      MiniMind-V `.pth` (with `vision_proj.*`): the language model and the projector.
    clip: CLIP vision weights for the encoder (any format `load_clip_vision` reads).
    """
    from .checkpoint import load_upstream, strict_load

    lm = getattr(model, "lm", model)
    if init:
        path = Path(init)
        state = load_weights(path) if path.is_dir() else load_state_dict(path)
        if any(k.startswith("model.layers.") for k in state):                # upstream names
            if any(k.startswith("vision_proj.") for k in state) and lm is not model:
                encoder = clip if clip else model.vision_encoder
                built = load_upstream(state, model.cfg, clip=encoder)
                model.lm.load_state_dict(built.lm.state_dict())
                model.vision_proj.load_state_dict(built.vision_proj.state_dict())
                model.vision_encoder.load_state_dict(built.vision_encoder.state_dict())
                log(f"init: upstream MiniMind-V weights (LM + projector) from {path}")
            else:
                lm.load_state_dict(load_upstream(state, lm.cfg).state_dict())
                log(f"init: upstream language model from {path}")
        elif lm is not model and not any(k.startswith("lm.") for k in state):
            strict_load(lm, state, str(path))
            log(f"init: language model from {path}")
        else:
            strict_load(model, state, str(path))
            log(f"init: every weight from {path}")
    if clip:
        from .clip_weights import load_clip_vision
        encoder, _ = load_clip_vision(clip)
        strict_load(model_parts(model)["vision"], encoder.state_dict(), str(clip))
        log(f"init: vision encoder from {clip}")


# ----------------------------------------------------------------------------- command line
def cli(argv: list[str]) -> int:
    """`minimind-v train --stage pretrain|sft --data JSONL --images DIR --tokenizer MODEL --out DIR`"""
    p = argparse.ArgumentParser(prog="minimind-v train", description="Pretrain or SFT a MiniMind-V model.")
    p.add_argument("--stage", choices=sorted(STAGE_DEFAULTS), required=True)
    p.add_argument("--data", required=True, help="JSONL conversations in the seed's format")
    p.add_argument("--images", required=True, help="folder the 'image' names are relative to")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the --init directory's)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--init", help="previous stage's directory, our LM model.pt, or an upstream .pth")
    p.add_argument("--clip", help="CLIP vision weights (OpenAI .pt, HF folder/safetensors/bin)")
    p.add_argument("--model-config", help="JSON file with VLMConfig fields (default: the real config, "
                                          "or the --init directory's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--feature-cache", action="store_true", help="encode every image once, memory-map the features")
    p.add_argument("--trainable", help="comma-separated groups overriding the stage rule: "
                                       "lm, last_block, projector, vision")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    a = p.parse_args(argv)

    from .config import VLMConfig
    from .data import VLMDataset, collate
    from .tokenizer import Tokenizer
    from .vlm import MiniMindVLM

    tcfg = TrainConfig(stage=a.stage, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, max_length=a.max_length,
                       accum_steps=a.accum_steps, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
                       grad_clip=a.grad_clip, dtype=a.dtype, compile=a.compile, feature_cache=a.feature_cache,
                       trainable=a.trainable.split(",") if a.trainable else None, save_every=a.save_every,
                       log_every=a.log_every, max_steps=a.max_steps, seed=a.seed, num_workers=a.num_workers,
                       device=a.device, resume=a.resume)
    init_dir = Path(a.init) if a.init and Path(a.init).is_dir() else None
    if a.model_config:
        cfg = VLMConfig(**json.loads(Path(a.model_config).read_text()))
    elif init_dir is not None:
        cfg = VLMConfig(**read_config(init_dir)["model_config"])
    else:
        cfg = VLMConfig()
    tok_file = a.tokenizer or (init_dir / TOKENIZER if init_dir and (init_dir / TOKENIZER).is_file() else None)
    if tok_file is None:
        p.error("--tokenizer is required (or an --init directory that holds one)")
    tok = Tokenizer(tok_file)
    if len(tok) > cfg.lm.vocab_size:
        p.error(f"the tokenizer has {len(tok)} pieces, more than the model's vocab_size {cfg.lm.vocab_size}")
    if cfg.image_pad_id != tok.image_pad_id:
        cfg.image_pad_id = tok.image_pad_id
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(tcfg.seed)
    model = MiniMindVLM(cfg)
    if not (tcfg.resume and (Path(a.out) / CHECKPOINT).is_file()):
        initialise(model, a.init, a.clip, log=print if rank == 0 else (lambda *_: None))
    dataset = VLMDataset(a.data, a.images, tok, max_length=tcfg.max_length, num_patches=cfg.num_patches,
                         image_size=cfg.vision.image_size, skip_bad=a.skip_bad)
    if rank == 0:
        write_config(a.out, cfg, tcfg.stage, tok_file, init=a.init, clip=a.clip)
    try:
        train(model, dataset, collate, tcfg, a.out, encoder=model.image_features)
    except TrainingError as e:
        print(f"minimind-v train: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
