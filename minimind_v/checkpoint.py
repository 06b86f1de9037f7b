"""Saving and loading weights: atomic writes, and import of upstream MiniMind checkpoints.

Upstream MiniMind (and Hugging Face's Llama, which uses the same names) stores the language
model as `model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`,
`model.layers.N.mlp.gate_proj.weight`, `model.layers.N.input_layernorm.weight`,
`model.norm.weight`, `lm_head.weight`. Our modules have their own, shorter names
(`layers.N.attn.q_proj.weight`, `layers.N.attn_norm.weight`, ...); `KEY_TABLE` is the
whole translation, read in both directions. A MiniMind-V file adds the projector under the name our `MiniMindVLM` uses
too (`vision_proj.vision_proj.0.weight` / `.bias`) and holds no vision encoder: the CLIP
weights come from their own file.

minimind-3v files (upstream's `*_768.pth` / `*_768_moe.pth`) add per-head q/k norms
(`model.layers.N.self_attn.q_norm.weight`), MoE layers (`model.layers.N.mlp.gate.weight`,
`model.layers.N.mlp.experts.E.gate_proj.weight`, ...) and name the projector `vision_proj.mlp.{0,1,3}.*`;
`upstream_generation` tells the generations apart by those keys, and `load_upstream` can build the
matching preset from it. Every load is strict: missing, unexpected and mis-shaped keys are listed
in the error, never silently skipped. Files are read with `torch.load(weights_only=True)`,
which refuses to run code hidden in a pickle.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from .config import LMConfig
from .first_release import is_first_release, to_current
from .safetensors_io import check_finite

# One table, read in both directions: upstream's name <-> ours; {i} is the layer index, {e} an
# expert's index, {p} a projection name (q/k/v/o or gate/up/down).
KEY_TABLE = [
    ("model.layers.{i}.self_attn.{p}_norm.weight", "layers.{i}.attn.{p}_norm.weight"),        # minimind-3v
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.gate.weight"),                       # MoE router
    ("model.layers.{i}.mlp.experts.{e}.{p}_proj.weight", "layers.{i}.ffn.experts.{e}.{p}_proj.weight"),
    ("model.embed_tokens.weight", "embed_tokens.weight"),
    ("model.layers.{i}.self_attn.{p}_proj.weight", "layers.{i}.attn.{p}_proj.weight"),
    ("model.layers.{i}.mlp.{p}_proj.weight", "layers.{i}.ffn.{p}_proj.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _pattern(template: str) -> re.Pattern:
    """'model.layers.{i}.x' -> a regex with named groups i and p."""
    regex = (re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
             .replace(r"\{p\}", r"(?P<p>q|k|v|o|gate|up|down)"))
    return re.compile(regex)


# The projector, per VLMConfig.projector: upstream's key prefix -> the prefix inside our VisionProjector
# (MiniMind2-V's names are ours; minimind-3v's MMVisionProjector keeps its layers in `mlp`).
PROJECTOR_PREFIX = {"linear": ("vision_proj.vision_proj.", "vision_proj."),
                    "mlp": ("vision_proj.mlp.", "vision_proj.")}


def upstream_generation(state: dict) -> str:
    """Which upstream file this is, by its keys: 'minimind-3v-moe' (expert keys), 'minimind-3v'
    (q_norm/k_norm or `vision_proj.mlp.*` keys), otherwise 'minimind2-v'."""
    if any(".mlp.experts." in k or k.endswith(".mlp.gate.weight") for k in state):
        return "minimind-3v-moe"
    if any(k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) or k.startswith("vision_proj.mlp.")
           for k in state):
        return "minimind-3v"
    return "minimind2-v"


def _generation_hint(state: dict, cfg) -> str:
    """A line for a mismatch error when the file is of another generation than the config."""
    found = upstream_generation(state)
    lm = cfg if isinstance(cfg, LMConfig) else cfg.lm
    wants = "minimind-3v-moe" if lm.use_moe else "minimind-3v" if lm.qk_norm else "minimind2-v"
    if found == wants:
        return ""
    return (f"\n  the file looks like {found} and the config like {wants}: build the config with "
            f"minimind_v.config.PRESETS[{found!r}]() (or pass cfg={found!r})")


def _rename(key: str, source: int) -> str | None:
    """Translate `key` with column `source` of KEY_TABLE (0: upstream -> ours, 1: ours -> upstream)."""
    for row in KEY_TABLE:
        m = _pattern(row[source]).fullmatch(key)
        if m:
            return row[1 - source].format(**m.groupdict())
    return None


def upstream_name(key: str) -> str:
    """Our LM key -> upstream's name for it (unchanged if no rule matches)."""
    return _rename(key, 1) or key


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact: rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state_dict(path: str | os.PathLike, map_location="cpu") -> dict:
    """A state dict from a .pth/.pt file, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    weights = state["model"] if isinstance(state.get("model"), dict) else state     # checkpoint.pt or weights
    check_finite(weights, path)                     # a damaged or diverged file names its first bad key
    return state


def translate_upstream(state: dict, source: str = "state dict") -> tuple[dict, list[str]]:
    """Rename upstream LM keys to ours. Returns (ours, keys that matched no rule)."""
    ours, unknown = {}, []
    for key, value in state.items():
        name = _rename(key, 0)
        if name is None:
            unknown.append(key)
        else:
            ours[name] = value
    return ours, unknown


def strict_load(module: torch.nn.Module, state: dict, source: str, ignore: tuple[str, ...] = (),
                rename=None) -> None:
    """load_state_dict that reports every missing, unexpected and mis-shaped key by name.

    `rename(key) -> str` names keys in the error as the file does (e.g. upstream names).
    """
    expected = module.state_dict()
    show = rename or (lambda k: k)
    missing = [show(k) for k in expected if k not in state and not k.startswith(ignore)]
    unexpected = [show(k) for k in state if k not in expected]
    shapes = [f"{show(k)}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{source}: does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if shapes:
            lines.append("  wrong shapes: " + "; ".join(shapes[:20]))
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=not ignore)


def load_upstream(path_or_state_dict, cfg, clip=None):
    """Build our model from an upstream MiniMind checkpoint.

    `cfg` is an `LMConfig` (returns `MiniMindLM`) or a `VLMConfig` (returns `MiniMindVLM`,
    whose frozen encoder comes from `clip`), or a preset name of `config.PRESETS`, or None: the
    preset of the generation `upstream_generation` finds in the file (its LM alone when the file
    has no projector). Tied embeddings: upstream files may or may not store `lm_head.weight`;
    when present it must equal the embedding matrix. Files of the first
    MiniMind2-V release (`tok_embeddings`, `layers.N.attention.wq`, interleaved RoPE) are renamed
    and their q/k rows reordered first (`first_release.py`).
    """
    from .config import PRESETS
    from .lm import MiniMindLM

    if isinstance(path_or_state_dict, dict):
        state, source = path_or_state_dict, "state dict"
    else:
        state, source = load_state_dict(path_or_state_dict), str(path_or_state_dict)
    if cfg is None or isinstance(cfg, str):
        name = cfg or upstream_generation(state)
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        if not any(k.startswith("vision_proj.") for k in state):
            cfg = cfg.lm
    if is_first_release(state):
        state = to_current(state, (cfg if isinstance(cfg, LMConfig) else cfg.lm).num_heads, source)
    if not isinstance(cfg, LMConfig):
        return _load_upstream_vlm(state, cfg, clip, source)
    model = MiniMindLM(cfg)
    _strict_load_lm(model, state, cfg, source)
    return model


def _strict_load_lm(model, state: dict, cfg: LMConfig, source: str) -> None:
    try:
        strict_load(model, _upstream_lm_state(state, cfg, source), source, rename=upstream_name)
    except ValueError as e:
        raise ValueError(str(e) + _generation_hint(state, cfg)) from None


def _upstream_lm_state(state: dict, cfg: LMConfig, source: str) -> dict:
    """Upstream LM keys -> our names, with the tied output matrix filled in or checked."""
    ours, unknown = translate_upstream(state, source)
    if unknown:
        raise ValueError(f"{source}: unexpected keys for a MiniMind LM ({len(unknown)}): "
                         f"{', '.join(unknown[:20])}" + _generation_hint(state, cfg))
    if cfg.tie_word_embeddings and "lm_head.weight" in ours and "embed_tokens.weight" in ours:
        if not torch.equal(ours["lm_head.weight"], ours["embed_tokens.weight"]):
            raise ValueError(f"{source}: lm_head.weight differs from model.embed_tokens.weight, "
                             f"but the config ties them (set tie_word_embeddings=False)")
    if cfg.tie_word_embeddings:
        ours.setdefault("lm_head.weight", ours.get("embed_tokens.weight"))
        if ours["lm_head.weight"] is None:
            del ours["lm_head.weight"]
    return ours


def _load_upstream_vlm(state: dict, cfg, clip, source: str):
    """A MiniMind-V file -> MiniMindVLM: LM keys + `vision_proj.*`, the encoder from `clip`.

    Upstream saves no `vision_encoder.*` keys (the CLIP / SigLIP weights are a separate download),
    so the encoder comes from `clip`: a file or folder `load_clip_vision` reads, or a built
    encoder. Its kind must be `cfg.vision_kind` and its shape `cfg.vision`.
    """
    from .config import VLMConfig
    from .vlm import MiniMindVLM

    if not isinstance(cfg, VLMConfig):
        raise TypeError(f"cfg must be an LMConfig or a VLMConfig, got {type(cfg).__name__}")
    encoder_keys = [k for k in state if k.startswith("vision_encoder.")]
    if encoder_keys:
        raise ValueError(f"{source}: holds vision encoder weights ({encoder_keys[0]}, ... "
                         f"{len(encoder_keys)} keys); a MiniMind-V checkpoint has none: "
                         f"drop them and pass the CLIP weights as clip=")
    theirs, inner = PROJECTOR_PREFIX[cfg.projector]
    proj = {(inner + k[len(theirs):] if k.startswith(theirs) else "?" + k): v
            for k, v in state.items() if k.startswith("vision_proj.")}     # "?": not this projector's name
    if not proj:
        raise ValueError(f"{source}: no vision_proj.* keys, so not a MiniMind-V checkpoint "
                         f"(a text-only MiniMind file loads with an LMConfig)")
    if clip is None:
        raise ValueError(f"{source}: a MiniMind-V checkpoint holds no vision encoder; pass the CLIP / SigLIP "
                         f"weights as clip= (a file or folder load_clip_vision reads, or an encoder)")
    lm_state = {k: v for k, v in state.items() if not k.startswith("vision_proj.")}
    encoder = _clip_encoder(clip, cfg.vision, cfg.vision_kind)
    model = MiniMindVLM(cfg)
    model.vision_encoder = encoder
    _strict_load_lm(model.lm, lm_state, cfg.lm, source)
    try:
        strict_load(model.vision_proj, proj, source,
                    rename=lambda k: k[1:] if k.startswith("?") else theirs + k[len(inner):])
    except ValueError as e:
        raise ValueError(str(e) + _generation_hint(state, cfg)) from None
    model.freeze_vision_encoder()
    return model


def _clip_encoder(clip, vision_cfg, kind: str = "clip"):
    """`clip` (a path or a built encoder) -> the encoder, checked against `kind` and `vision_cfg`."""
    from .vlm import ENCODERS

    if isinstance(clip, tuple(ENCODERS.values())):
        encoder, found, source = clip, clip.cfg, "the given encoder"
    elif isinstance(clip, (str, os.PathLike)):
        from .clip_weights import load_clip_vision
        encoder, found = load_clip_vision(clip)
        source = str(clip)
    else:
        raise TypeError(f"clip must be a path or a vision encoder, got {type(clip).__name__}")
    if not isinstance(encoder, ENCODERS[kind]):
        got = next(k for k, c in ENCODERS.items() if isinstance(encoder, c))
        raise ValueError(f"{source}: a {got} vision encoder, but the config's vision_kind is {kind!r}")
    # projection_dim only sizes CLIP's own image embedding, which MiniMind-V does not use
    diff = [f"{k}: {v} (expected {getattr(vision_cfg, k)})" for k, v in found.to_dict().items()
            if k != "projection_dim" and v != getattr(vision_cfg, k)]
    if diff:
        raise ValueError(f"{source}: vision encoder does not match the config: {'; '.join(diff)}")
    return encoder
