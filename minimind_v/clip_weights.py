"""Load CLIP's vision weights from the files people actually have, into our `CLIPVisionTransformer`.

Where it sits: before anything runs, the frozen image encoder needs OpenAI's trained weights.
`load_clip_vision(path)` is the one entry point; it reads any of
  1. OpenAI's own `ViT-B-16.pt`: a TorchScript zip archive (mostly float16). We never call
     `torch.jit.load` (that would build and run the archive's code); we read its pickled module
     tree with a restricted unpickler that knows only tensors, storages and inert stand-ins for
     TorchScript classes, and take the tensors out of the zip ourselves;
  2. a plain state-dict `.pt` / `.pth` with OpenAI's names (`visual.conv1.weight`, ...),
     loaded with `torch.load(weights_only=True)`;
  3. Hugging Face: a folder, `model.safetensors` (read by our `safetensors_io`) or
     `pytorch_model.bin`, of a CLIPModel / CLIPVisionModel(WithProjection), keys with or without
     the `vision_model.` prefix (text-tower keys are ignored);
  4. our own converted file (`minimind-v convert-clip SRC DST`), the fastest to load.
A Hugging Face SigLIP / SigLIP2 tower (minimind-3v's encoder; a biased patch conv and no CLS) in
any of the Hugging Face forms goes to `siglip.py` instead and comes back as a
`SiglipVisionTransformer`; `load_vision` is the same function under the kind-neutral name.
The configuration comes from the tensor shapes (width, patch size, positions, layers, MLP width,
projection); the head count, which shapes cannot tell, comes from a Hugging Face `config.json`
when there is one, otherwise CLIP's rule: heads of width 64.

The name map (OpenAI -> Hugging Face -> ours), per block i:
    conv1                  embeddings.patch_embedding        patch_embed
    class_embedding        embeddings.class_embedding        class_embedding
    positional_embedding   embeddings.position_embedding     position_embedding
    ln_pre                 pre_layrnorm                      ln_pre
    ...resblocks.i.ln_1    encoder.layers.i.layer_norm1      blocks.i.ln_1
    attn.in_proj_*         self_attn.{q,k,v}_proj (stacked)  blocks.i.attn.qkv
    attn.out_proj          self_attn.out_proj                blocks.i.attn.out
    ln_2                   layer_norm2                       blocks.i.ln_2
    mlp.c_fc / mlp.c_proj  mlp.fc1 / mlp.fc2                 blocks.i.mlp.fc1 / fc2
    ln_post                post_layernorm                    ln_post
    proj (D, E): x @ proj  visual_projection.weight (E, D)   proj.weight (E, D)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from . import safetensors_io
from .torchscript_archive import ArchiveError, read_torchscript_archive
from .config import VisionConfig
from .siglip import SiglipWeightsError, build_siglip, infer_siglip_config, siglip_prefix, siglip_to_our_names
from .vision import CLIPVisionTransformer, assign_weights

FORMAT_TAG = "minimind_v.clip_vision/1"     # marks a file written by `convert-clip`


class CLIPWeightsError(ArchiveError):
    """A file that is not a loadable CLIP vision checkpoint (the message names the file and key)."""


# --------------------------------------------------------------------------------------------
# 2. Reading any supported file into a flat dict of tensors
# --------------------------------------------------------------------------------------------

def _torch_load(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CLIPWeightsError(f"{path}: refused by torch.load(weights_only=True): {e}") from None
    except Exception as e:        # torch reports a damaged or foreign file in many ways
        raise CLIPWeightsError(f"{path}: cannot be read as a torch checkpoint (truncated, or not one): "
                               f"{type(e).__name__}: {e}") from None


def _hf_file_in(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            return folder / name
    raise CLIPWeightsError(f"{folder}: no model.safetensors or pytorch_model.bin in this folder")


def read_tensors(path) -> tuple[dict, dict]:
    """Any supported file or folder -> (flat dict name -> tensor, extra info such as config.json)."""
    path = Path(path)
    if path.is_dir():
        path = _hf_file_in(path)
    if not path.is_file():
        raise CLIPWeightsError(f"{path}: no such file")
    extra = {}
    config_json = path.parent / "config.json"
    if config_json.is_file():
        try:
            extra["hf_config"] = json.loads(config_json.read_text())
        except json.JSONDecodeError as e:
            raise CLIPWeightsError(f"{config_json}: not valid JSON ({e})") from None

    if path.name.endswith(".index.json"):                       # sharded Hugging Face checkpoint
        index = json.loads(path.read_text())
        tensors = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            tensors.update(read_tensors(path.parent / shard)[0])
        return tensors, extra

    with open(path, "rb") as f:
        magic = f.read(8)
    if path.suffix == ".safetensors":
        try:
            return safetensors_io.load_file(path), extra
        except safetensors_io.SafetensorsError as e:
            raise CLIPWeightsError(str(e)) from None
    if magic.startswith(b"PK\x03\x04"):                            # a zip: TorchScript or torch.save
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CLIPWeightsError(f"{path}: corrupt or truncated zip archive ({e})") from None
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            try:
                return read_torchscript_archive(path), extra
            except ArchiveError as e:
                raise CLIPWeightsError(str(e)) from None
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        extra["ours"] = obj
        return obj["state_dict"], extra
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]                                    # a {'state_dict': ...} wrapper
    if not isinstance(obj, dict):
        raise CLIPWeightsError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, extra


# --------------------------------------------------------------------------------------------
# 3. Names: OpenAI / Hugging Face / ours -> ours
# --------------------------------------------------------------------------------------------
# Each layout: the key that identifies it (its prefix tells where the vision tower lives), the
# key pattern of a block, and for each of our names the source key(s) (several are stacked).

LAYOUTS = {
    "openai": {
        "anchor": "conv1.weight",
        "block": r"transformer\.resblocks\.(\d+)\.",
        "block_prefix": "transformer.resblocks.{i}.",
        "top": {"patch_embed.weight": ["conv1.weight"], "class_embedding": ["class_embedding"],
                "position_embedding": ["positional_embedding"],
                "ln_pre.weight": ["ln_pre.weight"], "ln_pre.bias": ["ln_pre.bias"],
                "ln_post.weight": ["ln_post.weight"], "ln_post.bias": ["ln_post.bias"]},
        "proj": "proj",                 # (D, E), used as x @ proj
        "blocks": {"ln_1.weight": ["ln_1.weight"], "ln_1.bias": ["ln_1.bias"],
                   "attn.qkv.weight": ["attn.in_proj_weight"], "attn.qkv.bias": ["attn.in_proj_bias"],
                   "attn.out.weight": ["attn.out_proj.weight"], "attn.out.bias": ["attn.out_proj.bias"],
                   "ln_2.weight": ["ln_2.weight"], "ln_2.bias": ["ln_2.bias"],
                   "mlp.fc1.weight": ["mlp.c_fc.weight"], "mlp.fc1.bias": ["mlp.c_fc.bias"],
                   "mlp.fc2.weight": ["mlp.c_proj.weight"], "mlp.fc2.bias": ["mlp.c_proj.bias"]},
        "ignore": [],
    },
    "hf": {
        "anchor": "embeddings.patch_embedding.weight",
        "block": r"encoder\.layers\.(\d+)\.",
        "block_prefix": "encoder.layers.{i}.",
        "top": {"patch_embed.weight": ["embeddings.patch_embedding.weight"],
                "class_embedding": ["embeddings.class_embedding"],
                "position_embedding": ["embeddings.position_embedding.weight"],
                "ln_pre.weight": ["pre_layrnorm.weight"], "ln_pre.bias": ["pre_layrnorm.bias"],
                "ln_post.weight": ["post_layernorm.weight"], "ln_post.bias": ["post_layernorm.bias"]},
        "proj": "visual_projection.weight",     # (E, D), a Linear beside vision_model
        "blocks": {"ln_1.weight": ["layer_norm1.weight"], "ln_1.bias": ["layer_norm1.bias"],
                   "attn.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight"],
                   "attn.qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                     "self_attn.v_proj.bias"],
                   "attn.out.weight": ["self_attn.out_proj.weight"], "attn.out.bias": ["self_attn.out_proj.bias"],
                   "ln_2.weight": ["layer_norm2.weight"], "ln_2.bias": ["layer_norm2.bias"],
                   "mlp.fc1.weight": ["mlp.fc1.weight"], "mlp.fc1.bias": ["mlp.fc1.bias"],
                   "mlp.fc2.weight": ["mlp.fc2.weight"], "mlp.fc2.bias": ["mlp.fc2.bias"]},
        "ignore": ["embeddings.position_ids"],   # a non-learned buffer in older checkpoints
    },
    "ours": {
        "anchor": "patch_embed.weight",
        "block": r"blocks\.(\d+)\.",
        "block_prefix": "blocks.{i}.",
        "top": {k: [k] for k in ("patch_embed.weight", "class_embedding", "position_embedding",
                                 "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias")},
        "proj": "proj.weight",
        "blocks": {k: [k] for k in ("ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                    "attn.out.weight", "attn.out.bias", "ln_2.weight", "ln_2.bias",
                                    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")},
        "ignore": [],
    },
}


def detect_layout(tensors: dict, path) -> tuple[str, str]:
    """-> (layout name, prefix of the vision tower's keys, e.g. 'visual.' or 'vision_model.')."""
    found = []
    for name, layout in LAYOUTS.items():
        anchor = layout["anchor"]
        for key in tensors:
            if key.endswith(anchor) and (key == anchor or key[: -len(anchor)].endswith(".")):
                found.append((name, key[: -len(anchor)]))
    if len(found) != 1:
        sample = ", ".join(list(tensors)[:5]) or "(no tensors)"
        what = "several vision towers" if found else "not a CLIP vision checkpoint"
        raise CLIPWeightsError(
            f"{path}: {what}: expected exactly one key ending in 'conv1.weight' (OpenAI), "
            f"'embeddings.patch_embedding.weight' (Hugging Face) or 'patch_embed.weight'; "
            f"found {[p + LAYOUTS[n]['anchor'] for n, p in found]}; first keys: {sample}")
    return found[0]


def to_our_names(tensors: dict, path) -> tuple[dict, str]:
    """Rename (and stack / transpose where layouts differ) into our parameter names."""
    layout_name, prefix = detect_layout(tensors, path)
    layout = LAYOUTS[layout_name]
    vision_keys = {k for k in tensors if k.startswith(prefix)}
    layers = sorted({int(m.group(1)) for k in vision_keys
                     if (m := re.match(re.escape(prefix) + layout["block"], k))})
    if layers != list(range(len(layers))) or not layers:
        raise CLIPWeightsError(f"{path}: blocks should be numbered 0..L-1 under "
                               f"'{prefix}{layout['block_prefix'].format(i='N')}', found {layers}")

    wanted = {ours: [prefix + s for s in src] for ours, src in layout["top"].items()}
    for i in layers:
        block_prefix = prefix + layout["block_prefix"].format(i=i)
        for ours, src in layout["blocks"].items():
            wanted[f"blocks.{i}.{ours}"] = [block_prefix + s for s in src]
    # the projection: OpenAI keeps it inside `visual.`, Hugging Face beside `vision_model.`
    outer = prefix[: -len("vision_model.")] if prefix.endswith("vision_model.") else prefix
    proj_key = (outer if layout_name == "hf" else prefix) + layout["proj"]

    out, used = {}, set()
    for ours, sources in wanted.items():
        for s in sources:
            if s not in tensors:
                raise CLIPWeightsError(f"{path}: missing key {s!r} (needed for {ours})")
        parts = [tensors[s] for s in sources]
        out[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        used.update(sources)
    if proj_key in tensors:
        proj = tensors[proj_key]
        if proj.dim() != 2:
            raise CLIPWeightsError(f"{path}: key {proj_key!r} has shape {tuple(proj.shape)}, expected 2-D")
        out["proj.weight"] = proj.t() if layout_name == "openai" else proj
        used.add(proj_key)
    ignored = {prefix + k for k in layout["ignore"]}
    unexpected = sorted(vision_keys - used - ignored)
    if unexpected:
        raise CLIPWeightsError(f"{path}: unexpected key(s) in the vision tower: {unexpected[:5]}")
    return out, layout_name


# --------------------------------------------------------------------------------------------
# 4. Configuration from shapes, then the model
# --------------------------------------------------------------------------------------------

def infer_config(sd: dict, path, num_heads: int | None = None, hf_config: dict | None = None) -> VisionConfig:
    """Sizes from tensor shapes (our names); heads from the argument, config.json, or width / 64."""
    w = sd["patch_embed.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise CLIPWeightsError(f"{path}: patch embedding weight has shape {tuple(w.shape)}, "
                               "expected (width, channels, patch, patch)")
    width, channels, patch = w.shape[0], w.shape[1], w.shape[2]
    pos = sd["position_embedding"]
    grid = math.isqrt(max(pos.shape[0] - 1, 0))
    if pos.dim() != 2 or grid * grid != pos.shape[0] - 1 or grid == 0:
        raise CLIPWeightsError(f"{path}: position embedding has shape {tuple(pos.shape)}, "
                               "expected (1 + grid*grid, width)")
    vc = (hf_config or {}).get("vision_config", hf_config or {})
    act = vc.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise CLIPWeightsError(f"{path}: config.json says hidden_act={act!r}; this encoder implements "
                               "OpenAI CLIP's quick_gelu only")
    heads = num_heads or vc.get("num_attention_heads") or max(width // 64, 1)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    proj = sd.get("proj.weight")
    try:
        return VisionConfig(image_size=grid * patch, patch_size=patch, hidden_size=width,
                            num_layers=layers, num_heads=heads,
                            intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
                            layer_norm_eps=vc.get("layer_norm_eps", 1e-5),
                            projection_dim=proj.shape[0] if proj is not None else VisionConfig.projection_dim,
                            num_channels=channels)
    except ValueError as e:
        raise CLIPWeightsError(f"{path}: inconsistent sizes: {e}") from None


def build_model(sd: dict, cfg: VisionConfig, path, dtype=torch.float32,
                attn_impl: str = "manual") -> CLIPVisionTransformer:
    """Check every tensor's shape against the architecture, then assign the weights (no copy of init)."""
    with torch.device("meta"):
        model = CLIPVisionTransformer(cfg, with_projection="proj.weight" in sd, attn_impl=attn_impl)
    return assign_weights(model, sd, path, CLIPWeightsError, dtype)


def load_clip_vision(path, dtype=torch.float32, num_heads: int | None = None,
                     attn_impl: str = "manual") -> tuple[CLIPVisionTransformer, VisionConfig]:
    """Any supported CLIP (or SigLIP) file or folder -> (our encoder in eval mode, its VisionConfig).

    A SigLIP tower gives a `siglip.SiglipVisionTransformer` (its `kind` attribute says "siglip")."""
    tensors, extra = read_tensors(path)
    safetensors_io.check_finite(tensors, path)         # every weight finite, or the first bad key named
    if "ours" not in extra and siglip_prefix(tensors) is not None:
        try:
            sd = siglip_to_our_names(tensors, path)
            cfg = infer_siglip_config(sd, path, num_heads, extra.get("hf_config"))
            return build_siglip(sd, cfg, path, dtype, attn_impl), cfg
        except SiglipWeightsError as e:
            raise CLIPWeightsError(str(e)) from None
    if "ours" in extra:
        ours = extra["ours"]
        cfg = VisionConfig(**ours["config"])
        if num_heads:
            cfg.num_heads = num_heads
        return build_model(ours["state_dict"], cfg, path, dtype, attn_impl), cfg
    sd, _ = to_our_names(tensors, path)
    cfg = infer_config(sd, path, num_heads, extra.get("hf_config"))
    return build_model(sd, cfg, path, dtype, attn_impl), cfg


load_vision = load_clip_vision       # the dispatcher under a name that does not say CLIP


def save_converted(model: CLIPVisionTransformer, cfg: VisionConfig, dst) -> None:
    """Our plain format: {'format', 'config', 'state_dict'}, loadable with weights_only=True."""
    obj = {"format": FORMAT_TAG, "config": cfg.to_dict(),
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    tmp = f"{dst}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, dst)


def cli(argv: list[str]) -> int:
    """`minimind-v convert-clip SRC DST`: any supported format -> our plain state dict."""
    parser = argparse.ArgumentParser(prog="minimind-v convert-clip", description=cli.__doc__)
    parser.add_argument("src", help="OpenAI .pt, OpenAI-layout state dict, HF folder/.safetensors/.bin")
    parser.add_argument("dst", help="output .pt (loads with torch.load(weights_only=True))")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, if neither config.json nor width/64 gives the right count")
    args = parser.parse_args(argv)
    try:
        model, cfg = load_clip_vision(args.src, dtype=getattr(torch, args.dtype), num_heads=args.num_heads)
    except CLIPWeightsError as e:
        print(f"convert-clip: {e}", file=sys.stderr)
        return 1
    save_converted(model, cfg, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {n:,} parameters ({args.dtype}), {cfg}")
    return 0
