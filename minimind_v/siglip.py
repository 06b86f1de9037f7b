"""SigLIP's vision transformer from raw torch ops: the eyes of minimind-3v.

Where it sits: minimind-3v (`config.minimind_3v`) replaces MiniMind2-V's CLIP ViT-B/16 with
SigLIP2 ViT-B/32 at 256 px (upstream loads it as transformers' `SiglipVisionModel`). The block is
CLIP's (vision.py: pre-LN, fused-QKV attention, a 4x MLP; this module imports those pieces);
what differs is around it:

                          CLIP ViT-B/16 (vision.py)           SigLIP2 ViT-B/32 (here)
    input                 224 px, 16 px patches: 14x14=196    256 px, 32 px patches: 8x8 = 64
    patch conv            no bias                             with bias
    CLS token             yes (prepended)                     none
    LayerNorm before      ln_pre                              none
    MLP activation        quick_gelu                          gelu, tanh approximation
    LayerNorm eps         1e-5                                1e-6
    what the VLM takes    last block, before ln_post, CLS     last block AFTER ln_post
                          dropped: (B, 196, 768)              (last_hidden_state): (B, 64, 768)
    pooled vector         ln_post(CLS) @ proj                 attention pooling head (MAP)
    trained with          softmax contrastive loss            sigmoid loss, pair by pair

The data flow (D = 768, P = 64):
    pixels (B, 3, 256, 256)    from `preprocess_siglip`: resize to 256x256, (x/255 - 0.5) / 0.5
    -> 32x32 conv, stride 32, bias   (B, D, 8, 8) -> (B, 64, D)
    -> + learned position embeddings (B, 64, D)
    -> 12 blocks x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))
    -> ln_post                       (B, 64, D)   = `forward` = `patch_features`
    -> head (optional): one learned query (probe) attends over the 64 vectors, + MLP -> (B, D)

Also here: reading Hugging Face SigLIP / SigLIP2 weights into our names (`clip_weights.load_clip_vision`
calls `siglip_to_our_names` / `infer_siglip_config` when a file holds a SigLIP tower), and the image
preprocessing of transformers' `SiglipImageProcessor` (Pillow + numpy).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import VisionConfig
from .vision import VisionBlock, assign_weights, attention, patch_tokens


class SiglipWeightsError(ValueError):
    """A SigLIP file that cannot be loaded (the message names the file and the key)."""


# --------------------------------------------------------------------------------------------
# 1. The encoder
# --------------------------------------------------------------------------------------------

class SiglipMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))): (.., D) -> (.., F) -> (.., D)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipBlock(VisionBlock):
    """CLIP's pre-LN block (attention, residuals, norms: vision.VisionBlock) with SigLIP's MLP."""

    def __init__(self, cfg: VisionConfig, attn_impl: str = "manual"):
        super().__init__(cfg, attn_impl)
        self.mlp = SiglipMLP(cfg)


class AttentionPoolingHead(nn.Module):
    """Multi-head attention pooling (MAP): a learned query `probe` (1, 1, D) attends over the patch
    vectors, then a residual MLP. (B, P, D) -> (B, D): SigLIP's pooled image vector."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.probe = nn.Parameter(torch.randn(1, 1, D))
        self.qkv = nn.Linear(D, 3 * D)                 # rows [W_q; W_k; W_v], as nn.MultiheadAttention's in_proj
        self.out = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, D = x.shape
        H, d = self.num_heads, D // self.num_heads
        w_q, w_kv = self.qkv.weight.split([D, 2 * D])
        b_q, b_kv = self.qkv.bias.split([D, 2 * D])
        q = F.linear(self.probe.expand(B, 1, D), w_q, b_q).view(B, 1, H, d).transpose(1, 2)   # (B, H, 1, d)
        k, v = F.linear(x, w_kv, b_kv).view(B, P, 2, H, d).permute(2, 0, 3, 1, 4)             # (B, H, P, d) each
        h = self.out(attention(q, k, v)[0].transpose(1, 2).reshape(B, 1, D))                  # (B, 1, D)
        h = h + self.mlp(self.ln(h))
        return h[:, 0]                                                                         # (B, D)


class SiglipVisionTransformer(nn.Module):
    """SigLIP's image tower. `forward(pixels (B, 3, S, S))` -> (B, P, D), after the final LayerNorm
    (transformers' `last_hidden_state`). `with_head=False`: no pooling head (`pooled_output` raises)."""

    kind = "siglip"

    def __init__(self, cfg: VisionConfig, with_head: bool = True, attn_impl: str = "manual"):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(cfg.num_patches, D) * D ** -0.5)
        self.blocks = nn.ModuleList(SiglipBlock(cfg, attn_impl) for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head = AttentionPoolingHead(cfg) if with_head else None
        for name, p in self.named_parameters():         # a ViT-like random init (tests, demos)
            if p.dim() == 2 and "embedding" not in name:
                nn.init.normal_(p, std=0.02)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, S, S) -> token vectors (B, P, D) entering the first block."""
        x = patch_tokens(self.patch_embed, self.cfg, pixels)              # (B, P, D), row-major patches
        return x + self.position_embedding.to(x.dtype)

    def encode(self, pixels: torch.Tensor, need_weights: bool = False):
        """-> (hidden (B, P, D) after ln_post, list of per-layer attention probs (B, H, P, P))."""
        x = self.embed(pixels)
        attns = []
        for block in self.blocks:
            x, probs = block(x, need_weights)
            if need_weights:
                attns.append(probs)
        return self.ln_post(x), attns

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(pixels)[0]                   # (B, P, D)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """What minimind-3v feeds its projector: every patch vector after ln_post. (B, P, D)."""
        return self.forward(pixels)

    def pooled_output(self, pixels: torch.Tensor) -> torch.Tensor:
        """The attention-pooled image vector (transformers' `pooler_output`). (B, D)."""
        if self.head is None:
            raise RuntimeError("this vision tower has no pooling head (its checkpoint had none)")
        return self.head(self.forward(pixels))


# --------------------------------------------------------------------------------------------
# 2. Hugging Face SigLIP / SigLIP2 weights -> our names
# --------------------------------------------------------------------------------------------
# Hugging Face name (under the tower's prefix, e.g. 'vision_model.') -> ours; q/k/v are stacked.
TOP = {"embeddings.patch_embedding.weight": "patch_embed.weight",
       "embeddings.patch_embedding.bias": "patch_embed.bias",
       "embeddings.position_embedding.weight": "position_embedding",
       "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out",
         "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
HEAD = {"head.probe": "head.probe", "head.attention.in_proj_weight": "head.qkv.weight",
        "head.attention.in_proj_bias": "head.qkv.bias", "head.attention.out_proj.weight": "head.out.weight",
        "head.attention.out_proj.bias": "head.out.bias", "head.layernorm.weight": "head.ln.weight",
        "head.layernorm.bias": "head.ln.bias", "head.mlp.fc1.weight": "head.mlp.fc1.weight",
        "head.mlp.fc1.bias": "head.mlp.fc1.bias", "head.mlp.fc2.weight": "head.mlp.fc2.weight",
        "head.mlp.fc2.bias": "head.mlp.fc2.bias"}
ANCHOR = "embeddings.patch_embedding.bias"             # CLIP's patch conv has no bias


def siglip_prefix(tensors: dict) -> str | None:
    """The prefix of a SigLIP vision tower's keys ('' or e.g. 'vision_model.'), None if there is none.

    A SigLIP tower has a biased patch conv and no class embedding (CLIP has the opposite)."""
    found = [k[: -len(ANCHOR)] for k in tensors
             if k.endswith(ANCHOR) and (k == ANCHOR or k[: -len(ANCHOR)].endswith("."))]
    if len(found) != 1 or any(k.startswith(found[0]) and k.endswith("class_embedding") for k in tensors):
        return None
    return found[0]


def siglip_to_our_names(tensors: dict, path) -> dict:
    """Rename a Hugging Face SigLIP(2) vision tower (SiglipVisionModel or the vision half of a
    SiglipModel) to our names; every key under the tower's prefix must be used."""
    prefix = siglip_prefix(tensors)
    if prefix is None:
        raise SiglipWeightsError(f"{path}: not a SigLIP vision checkpoint (expected one key ending in "
                                 f"{ANCHOR!r} and no class_embedding)")
    layers = sorted({int(m.group(1)) for k in tensors
                     if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise SiglipWeightsError(f"{path}: blocks should be numbered 0..L-1 under "
                                 f"'{prefix}encoder.layers.N.', found {layers}")
    wanted = {ours: [hf] for hf, ours in TOP.items()}
    for i in layers:
        for hf, ours in BLOCK.items():
            for w in ("weight", "bias"):
                wanted[f"blocks.{i}.{ours}.{w}"] = [f"encoder.layers.{i}.{hf}.{w}"]
        for w in ("weight", "bias"):
            wanted[f"blocks.{i}.attn.qkv.{w}"] = [f"encoder.layers.{i}.self_attn.{x}_proj.{w}" for x in "qkv"]
    has_head = any(k.startswith(prefix + "head.") for k in tensors)
    if has_head:
        wanted.update({ours: [hf] for hf, ours in HEAD.items()})
    out, used = {}, {prefix + "embeddings.position_ids"}          # a buffer some files keep
    for ours, sources in wanted.items():
        keys = [prefix + s for s in sources]
        for k in keys:
            if k not in tensors:
                raise SiglipWeightsError(f"{path}: missing key {k!r} (needed for {ours})")
        out[ours] = tensors[keys[0]] if len(keys) == 1 else torch.cat([tensors[k] for k in keys], dim=0)
        used.update(keys)
    # keys outside the tower (a SiglipModel's text_model.*, logit_scale, logit_bias) are not ours to check
    unexpected = sorted(k for k in tensors if k.startswith(prefix) and k not in used
                        and not (prefix == "" and k.split(".")[0] in ("text_model", "logit_scale", "logit_bias")))
    if unexpected:
        raise SiglipWeightsError(f"{path}: unexpected key(s) in the SigLIP vision tower: {unexpected[:5]}")
    return out


def infer_siglip_config(sd: dict, path, num_heads: int | None = None, hf_config: dict | None = None) -> VisionConfig:
    """Sizes from the tensor shapes (our names); heads and eps from config.json when there is one."""
    w = sd["patch_embed.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise SiglipWeightsError(f"{path}: patch embedding weight has shape {tuple(w.shape)}, "
                                 "expected (width, channels, patch, patch)")
    width, channels, patch = w.shape[0], w.shape[1], w.shape[2]
    pos = sd["position_embedding"]
    grid = math.isqrt(pos.shape[0])
    if grid * grid != pos.shape[0] or pos.shape[1] != width:
        raise SiglipWeightsError(f"{path}: position embedding has shape {tuple(pos.shape)}, "
                                 f"expected (grid*grid, {width})")
    vc = (hf_config or {}).get("vision_config", hf_config or {})
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise SiglipWeightsError(f"{path}: config.json says hidden_act={act!r}; this encoder implements "
                                 "SigLIP's tanh-approximated gelu only")
    try:
        return VisionConfig(image_size=grid * patch, patch_size=patch, hidden_size=width,
                            num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                            num_heads=num_heads or vc.get("num_attention_heads") or max(width // 64, 1),
                            intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
                            layer_norm_eps=vc.get("layer_norm_eps", 1e-6), num_channels=channels)
    except ValueError as e:
        raise SiglipWeightsError(f"{path}: inconsistent sizes: {e}") from None


def build_siglip(sd: dict, cfg: VisionConfig, path, dtype=torch.float32,
                 attn_impl: str = "manual") -> SiglipVisionTransformer:
    """Check every shape against the architecture, then assign the weights (eval mode)."""
    with torch.device("meta"):
        model = SiglipVisionTransformer(cfg, with_head="head.probe" in sd, attn_impl=attn_impl)
    return assign_weights(model, sd, path, SiglipWeightsError, dtype)


# --------------------------------------------------------------------------------------------
# 3. Preprocessing, as transformers' SiglipImageProcessor (with upstream's settings)
# --------------------------------------------------------------------------------------------
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS}


def preprocess_siglip(image: Image.Image, size: int = 256, resample: str = "bilinear",
                      mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """A PIL image -> SigLIP pixel values, float32 (3, size, size).

    1. to RGB: RGBA / LA drop their alpha band (upstream converts them with `convert('RGB')` before
       the processor; CLIP's `image.to_rgb` composites onto white instead); other modes via Pillow;
    2. resize to size x size, ignoring the aspect ratio (no crop), with `resample` (siglip2-base-p32-256's
       preprocessor_config.json: 256 px, bilinear; the processor class defaults are 224 px, bicubic);
    3. x / 255 (in float64, rounded once to float32), then (x - mean) / std per channel: -1..1.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    if min(image.size) == 0:
        raise ValueError(f"cannot preprocess an empty image of size {image.size}")
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb.resize((size, size), resample=RESAMPLE[resample]))       # (S, S, 3) uint8
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))              # (3, S, S)


def preprocessor_settings(folder) -> dict:
    """`preprocess_siglip` keyword arguments from a folder's preprocessor_config.json (size, resample,
    mean, std); {} when there is none."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SiglipWeightsError(f"{path}: not valid JSON ({e})") from None
    out = {}
    size = cfg.get("size", {})
    if size:
        if size.get("height") != size.get("width") or not size.get("height"):
            raise SiglipWeightsError(f"{path}: size {size} is not a square height x width")
        out["size"] = int(size["height"])
    if "resample" in cfg:
        names = {int(v): k for k, v in RESAMPLE.items()}
        if int(cfg["resample"]) not in names:
            raise SiglipWeightsError(f"{path}: resample {cfg['resample']} is not one of {sorted(names)}")
        out["resample"] = names[int(cfg["resample"])]
    for key, ours in (("image_mean", "mean"), ("image_std", "std")):
        if key in cfg:
            out[ours] = tuple(cfg[key])
    return out
