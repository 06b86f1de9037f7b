"""The run directory: what `train` writes, and what `chat`, `eval`, `demo` and `train --init` read.

Where it sits: between training and everything that uses a trained model. A run directory holds

    config.json       the model config and kind ("lm" or "vlm"), the stage, how it was made
    model.pt          the final weights (written when a run finishes)
    checkpoint.pt     the full training state, for resuming (weights, optimizer, step, RNG, data position)
    metrics.jsonl     one line per optimizer step
    tokenizer.model   the tokenizer the model was trained with (a copy)
    loss.png          the loss curve

so a directory can be loaded on its own: `load_model(dir)` rebuilds the model from config.json
and loads model.pt (or, for a run still going, the weights of its latest checkpoint.pt);
`load_chat_model(dir)` adds the tokenizer. `initialise` loads starting weights into a new model
from any of the files a user may have: one of our directories, one of our state dicts, or an
upstream MiniMind / MiniMind-V `.pth`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .checkpoint import load_state_dict, load_upstream, strict_load
from .config import LMConfig, VLMConfig

CHECKPOINT = "checkpoint.pt"      # full training state, for resuming
WEIGHTS = "model.pt"              # final weights only, for chat and the next stage
CONFIG = "config.json"            # model config + how the directory was made
METRICS = "metrics.jsonl"         # one line per optimizer step
LOSS_PNG = "loss.png"
TOKENIZER = "tokenizer.model"   # a sentencepiece tokenizer; or
HF_TOKENIZER = "tokenizer"       # a folder with a Hugging Face tokenizer.json + tokenizer_config.json


def write_config(out_dir, model_cfg, stage: str, tokenizer_file=None, **extra) -> None:
    """config.json: the model config and kind, so `chat` can rebuild the model; copies the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"kind": "lm" if isinstance(model_cfg, LMConfig) else "vlm", "model_config": model_cfg.to_dict(),
            "stage": stage, **extra}
    if tokenizer_file is not None:
        info["tokenizer"] = copy_tokenizer(tokenizer_file, out_dir)
    tmp = out_dir / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out_dir / CONFIG)


def copy_tokenizer(source, out_dir: Path) -> str:
    """Copy a tokenizer into the run directory; returns its name there.

    A sentencepiece `.model` becomes `tokenizer.model`; a Hugging Face `tokenizer.json` (or a
    folder holding one) becomes the folder `tokenizer/` with its `tokenizer_config.json`.
    """
    source = Path(source)
    if source.is_dir() and (source / "tokenizer.json").is_file():
        source = source / "tokenizer.json"
    if source.suffix == ".json":
        folder = out_dir / HF_TOKENIZER
        folder.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source.parent / name).is_file() and (source.parent / name).resolve() != (folder / name).resolve():
                shutil.copyfile(source.parent / name, folder / name)
        return HF_TOKENIZER
    if source.is_dir():
        source = source / TOKENIZER
    if source.resolve() != (out_dir / TOKENIZER).resolve():
        shutil.copyfile(source, out_dir / TOKENIZER)
    return TOKENIZER


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """config.json of a run directory, as a dict."""
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint directory (no {CONFIG})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_weights(ckpt_dir: str | os.PathLike) -> dict:
    """The model state dict of a checkpoint directory: model.pt, or the latest checkpoint.pt."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS).is_file():
        return load_state_dict(ckpt_dir / WEIGHTS)
    if (ckpt_dir / CHECKPOINT).is_file():
        return load_state_dict(ckpt_dir / CHECKPOINT)["model"]
    raise FileNotFoundError(f"{ckpt_dir}: no {WEIGHTS} or {CHECKPOINT}")


def model_from_config(info: dict):
    """config.json contents -> an untrained model of that shape."""
    if info["kind"] == "lm":
        from .lm import MiniMindLM
        return MiniMindLM(LMConfig(**info["model_config"]))
    from .vlm import MiniMindVLM
    return MiniMindVLM(VLMConfig(**info["model_config"]))


def load_model(ckpt_dir, device="cpu", info: dict | None = None):
    """A checkpoint directory -> (model in eval mode, config.json contents); `info`: the contents
    already read (so the weights are built from the same config that was checked)."""
    info = read_config(ckpt_dir) if info is None else info
    model = model_from_config(info)
    weights = load_weights(ckpt_dir)
    match_projection(model, weights)
    strict_load(model, weights, str(ckpt_dir))
    return model.to(device).eval(), info


def match_projection(model, weights: dict) -> None:
    """Drop CLIP's image-embedding projection from `model` when `weights` have none.

    A VLM never uses it (it takes the patch vectors), and a Hugging Face CLIPVisionModel file has
    no such matrix; every other key stays strictly checked.
    """
    if hasattr(model, "vision_encoder") and "vision_encoder.proj.weight" not in weights:
        model.vision_encoder.proj = None


def tokenizer_file(ckpt_dir, info: dict) -> Path:
    """The tokenizer stored beside the weights (named in config.json)."""
    path = Path(ckpt_dir) / info.get("tokenizer", TOKENIZER)
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no tokenizer ({path.name}) beside the weights")
    return path


def load_chat_model(ckpt_dir, device="cpu"):
    """A checkpoint directory -> (model in eval mode, tokenizer, config.json contents)."""
    from .tokenizer import load_tokenizer

    info = read_config(ckpt_dir)
    tok_path = tokenizer_file(ckpt_dir, info)
    tok = load_tokenizer(tok_path, label_newline=info.get("label_newline"))
    check_tokenizer_fits(tok, info["model_config"], tok_path)     # before the weights are read
    model, info = load_model(ckpt_dir, device, info)
    model.run_info = info                   # how it wants its pictures and prompts (chat.image_settings)
    return model, tok, info


def check_tokenizer_fits(tok, model_config: dict, source) -> None:
    """A tokenizer fits a model when its ids index the embedding and its image id is the model's."""
    lm = model_config.get("lm", model_config)
    if len(tok) > lm["vocab_size"]:
        raise ValueError(f"{source}: the tokenizer has {len(tok)} pieces but the model's embedding has "
                         f"{lm['vocab_size']} rows; expected the tokenizer the model was trained with")
    pad = model_config.get("image_pad_id")
    if pad is not None and tok.image_pad_id != pad:
        raise ValueError(f"{source}: the tokenizer's image placeholder is id {tok.image_pad_id}, the model "
                         f"expects id {pad}; expected the tokenizer the model was trained with")


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
            match_projection(model, state)
            strict_load(model, state, str(path))
            log(f"init: every weight from {path}")
    if clip:
        from .clip_weights import load_clip_vision
        encoder, _ = load_clip_vision(clip)
        strict_load(model.vision_encoder, encoder.state_dict(), str(clip))
        log(f"init: vision encoder from {clip}")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as dicts; a half-written last line (a run killed mid-write) is left out."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n != len(lines):
                raise ValueError(f"{path}:{n}: not a JSON line") from None
    return rows


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metrics lines written after the checkpoint a run resumes from."""
    if path.is_file():
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- one run per directory
LOCK = "run.lock"
RUN_FILES = (CHECKPOINT, WEIGHTS, METRICS, LOSS_PNG)     # what a run writes (config.json comes first)
_held: dict[Path, int] = {}                              # directories this process has locked -> depth


class RunDirError(RuntimeError):
    """The directory is in use by another run, or holds a run this command would overwrite."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                              # alive, someone else's
        return True
    return True


class RunLock:
    """`with RunLock(dir):` this process is the only run writing `dir` (re-entrant within a process).

    The lock is the file `dir/run.lock`, created atomically (O_CREAT | O_EXCL) and holding the pid,
    host and start time. A lock left by a process that died on this host is reported and replaced;
    a live one (or one from another host, which cannot be checked) makes a second run fail at once.
    """

    def __init__(self, out_dir, log=print):
        self.dir = Path(out_dir).resolve()
        self.log = log

    def __enter__(self):
        if _held.get(self.dir):
            _held[self.dir] += 1
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(path.read_text())
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and isinstance(other.get("pid"), int) \
                        and not _pid_alive(other["pid"]):
                    self.log(f"{path}: removing a stale lock of process {other['pid']} (started "
                             f"{other.get('started', '?')}), which is no longer running")
                    path.unlink(missing_ok=True)
                    continue
                raise RunDirError(f"{self.dir} is in use by another run (process {other.get('pid', '?')} on "
                                  f"{other.get('host', '?')}, started {other.get('started', '?')}); wait for it "
                                  f"to finish, or choose another --out (remove {path} if that run is gone)") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            _held[self.dir] = 1
            return self
        raise RunDirError(f"{path}: could not take the lock")

    def __exit__(self, *exc):
        _held[self.dir] -= 1
        if _held[self.dir] == 0:
            del _held[self.dir]
            (self.dir / LOCK).unlink(missing_ok=True)
        return False


def prepare(out_dir, resume: bool, overwrite: bool = False, log=print) -> None:
    """Refuse to lose a run: resume needs a checkpoint; a finished or started run needs --overwrite.

    With `overwrite`, the previous run's files are removed first (the feature cache is kept: it is
    keyed by the encoder and checked on reuse). Call it while holding the `RunLock`.
    """
    out_dir = Path(out_dir)
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if resume:
        if not (out_dir / CHECKPOINT).is_file():
            raise RunDirError(f"--resume: {out_dir} has no {CHECKPOINT} to continue from"
                              + (f" (it holds {', '.join(found)})" if found else ""))
        return
    if found and not overwrite:
        raise RunDirError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                          f"--overwrite to replace it, or choose another --out")
    for name in found:
        (out_dir / name).unlink()
        log(f"--overwrite: removed {out_dir / name}")


def clean_temp_files(out_dir, log=print) -> None:
    """Remove temp files that killed saves left behind (`.NAME.*.tmp`, `NAME.tmp`)."""
    for tmp in list(Path(out_dir).glob(".*.tmp")) + list(Path(out_dir).glob("*.tmp")):
        if tmp.is_file():
            tmp.unlink()
            log(f"removed {tmp}, left by a save that was interrupted")
