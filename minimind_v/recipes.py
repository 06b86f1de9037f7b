"""Training recipes: the settings that make a small model learn from scratch, by name.

Where it sits: between the command line and `train.py`. The real defaults (`train.STAGE_DEFAULTS`)
are MiniMind2-V's: a trained LM, a CLIP encoder, lr 1e-6 for SFT. A user who trains a *small
model from scratch* on a small dataset needs other numbers, and without them the model learns to
answer from the question alone (the answer format, the most common answer per question) and
barely looks at the picture. A recipe is those numbers with a name:

    minimind-v model-config --tokenizer tok.model --image-size 64 --out cfg.json     # a small model
    minimind-v train --stage sft --recipe from-scratch-small --model-config cfg.json ...

What `from-scratch-small` sets, and why (`benchmarks/tuning.md` has the runs):
- the vision encoder: a frozen *random* one-layer ViT (no --clip needed). A fixed random
  feature map still tells colours and shapes apart; one layer, because each random attention
  layer mixes the patches at random. The `small` preset gives it the "conv" stem
  (`vision.ConvStem`, 256 feature maps): a 5x5 convolution at every pixel and the maximum over
  each patch, so a shape that falls anywhere inside a patch gives the same vector (CLIP's
  stride-p patch convolution sees it through different random weights at each offset);
- the ViT's position embeddings, scaled by stem (`pos_scale`): x1 (as drawn) for the conv stem,
  x3 for "both", x10 for CLIP's patch stem. The LM's RoPE already tells each image token's place
  in the sequence, so a conv-stem model needs no help to say where a patch sits (x0 and x1 both
  read "is it in the top half" at 96%), and at x10 the positions swamp the shapes. The patch
  stem's vectors do need them: the demo (one shape centred in each of 9 patches, patch stem) and
  the glyph boards were tuned at x10;
- the LM's embeddings drawn with std 0.1 (`embed_std`) instead of 0.02: the output matrix is tied
  to them, and at 0.02 no logit of a hidden-128 model can exceed ~2.6, too flat to be confident;
- what trains: the LM and the projector; lr 1e-3, no warmup, batch 64, 4000 steps for SFT
  (120 for a caption pretraining); the encoder's features cached once (`feature_cache`). At 2e-3
  (the demo's first setting) several freely placed objects were never looked up; at 1e-3 they
  are, and the demo still learns its pictures well before step 4000.
An explicit option always wins over the recipe (`resolve` says where each value came from).
The init settings touch only weights that start random: not an --init checkpoint's, not --clip's.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .config import STEMS, LMConfig, VisionConfig, VLMConfig


def opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ModelInit:
    """How the weights that start random are drawn (None: as the modules initialise them)."""
    pos_scale: float | None = opt(None, "multiply a random (not --clip) ViT's position embeddings by this")
    embed_std: float | None = opt(None, "draw a fresh LM's token embeddings with this std (tied output)")


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    init: dict                    # ModelInit fields; a dict value is per vision stem (`init_for`)
    stages: dict                  # stage -> TrainConfig fields
    preset: str                   # the `model-config` preset it was made for


POS_SCALE = {"conv": 1.0, "both": 3.0, "patch": 10.0}   # by vision stem: the docstring says why
_COMMON = dict(lr=1e-3, batch_size=64, warmup_steps=0, feature_cache=True, epochs=10 ** 6, log_every=100)
RECIPES = {
    "from-scratch-small": Recipe(
        "from-scratch-small",
        "a small model from scratch on a small VQA set, CPU minutes: frozen random 1-layer ViT "
        "(positions x1 with the conv stem, x10 with CLIP's patch stem), embeddings std 0.1, "
        "LM + projector learn, lr 1e-3, batch 64, 4000 SFT steps",
        init=dict(pos_scale=POS_SCALE, embed_std=0.1),
        stages={"pretrain": dict(_COMMON, max_steps=120),
                "sft": dict(_COMMON, max_steps=4000, trainable=("lm", "projector"))},
        preset="small"),
    "smoke": Recipe(
        "smoke", "the same in seconds, to check a pipeline (learns little): batch 16, 4 + 12 steps",
        init=dict(pos_scale=POS_SCALE, embed_std=0.1),
        stages={"pretrain": dict(_COMMON, batch_size=16, max_steps=4, log_every=4),
                "sft": dict(_COMMON, batch_size=16, max_steps=12, log_every=4, trainable=("lm", "projector"))},
        preset="tiny"),
}


def init_for(recipe: Recipe, stem: str) -> dict:
    """The recipe's ModelInit values for a model whose ViT has this stem: a per-stem value (a dict,
    such as `pos_scale`'s) is picked for it."""
    return {k: v[stem] if isinstance(v, dict) else v for k, v in recipe.init.items()}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve(cls, recipe_values: dict, given: dict):
    """(cls(**values), sources): explicit `given` values win over the recipe's, the recipe's over
    the defaults; sources maps each field to 'option', 'recipe' or 'default'."""
    values = {**recipe_values, **given}
    sources = {f.name: "option" if f.name in given else "recipe" if f.name in recipe_values else "default"
               for f in fields(cls)}
    return cls(**values), sources


def describe(obj, sources: dict, keys=None) -> str:
    """One line per setting: `  lr = 0.002  (recipe)`."""
    keys = keys or [f.name for f in fields(obj)]
    return "\n".join(f"  {k} = {getattr(obj, k)!r}  ({sources.get(k, 'default')})" for k in keys)


def settings_from_args(args, train_config_cls, recipe: Recipe | None, cfg, log=print):
    """`minimind-v train`'s effective (TrainConfig, ModelInit): explicit options > the recipe > the
    defaults; printed, with where each value came from, when a recipe or an init option is used."""
    names = lambda cls: [f.name for f in fields(cls)]                         # noqa: E731
    given = {k: getattr(args, k) for k in names(train_config_cls) if getattr(args, k, None) is not None}
    from_recipe = dict(recipe.stages[args.stage]) if recipe else {}
    if recipe is not None:
        from_recipe["max_length"] = cfg.lm.max_seq_len                       # what the small model can hold
    tcfg, sources = resolve(train_config_cls, from_recipe, given)
    init, init_sources = resolve(ModelInit, init_for(recipe, cfg.vision.stem) if recipe else {},
                                 {k: getattr(args, k) for k in names(ModelInit) if getattr(args, k, None) is not None})
    if recipe is not None or "option" in init_sources.values():
        log(f"settings ({'recipe ' + recipe.name if recipe else 'no recipe'}, {cfg.vision.stem} vision stem; "
            "explicit options win):")
        shown = [k for k in names(train_config_cls) if sources[k] != "default"] + ["epochs", "max_length"]
        log(describe(tcfg, sources, list(dict.fromkeys(shown)) if recipe else None))
        log(describe(init, init_sources))
    return tcfg, init


# ----------------------------------------------------------------------------- initialisation
@torch.no_grad()
def apply_init(model, init: ModelInit, fresh_lm: bool = True, fresh_vision: bool = True, log=print) -> None:
    """Redraw / rescale the weights that start random. The order (embeddings, then positions) is
    part of the recipe: the embeddings consume the random stream, the scaling does not."""
    if init.embed_std is not None and fresh_lm:
        model.lm.embed_tokens.weight.normal_(0.0, init.embed_std)
        log(f"init: token embeddings drawn with std {init.embed_std}")
    if init.pos_scale is not None and fresh_vision and hasattr(model, "vision_encoder"):
        model.vision_encoder.position_embedding.mul_(init.pos_scale)
        log(f"init: random ViT position embeddings x{init.pos_scale:g}")


# ----------------------------------------------------------------------------- small model configs
PRESETS = {    # LM hidden/layers, ViT hidden/layers; heads = hidden / 32 (>= 2), kv heads = half; the ViT stem
    "small": dict(hidden=128, layers=2, vision_hidden=128, vision_layers=1, stem="conv", stem_channels=256),
    "tiny": dict(hidden=32, layers=2, vision_hidden=32, vision_layers=1, stem="patch", stem_channels=64),   # smoke: a pipeline check
}


def pick_patch_size(image_size: int) -> int:
    """The largest patch of 8..16 px that divides the picture into a grid of 3..8 per side."""
    for p in range(16, 7, -1):
        if image_size % p == 0 and 3 <= image_size // p <= 8:
            return p
    raise ValueError(f"image size {image_size}: no patch size of 8-16 px divides it into a 3x3 to 8x8 grid "
                     f"(choose e.g. 48, 64, 96, or pass --patch-size)")


def model_config(vocab_size: int, image_pad_id: int, image_size: int = 48, preset: str = "small",
                 patch_size: int | None = None, max_seq_len: int = 256, projector: str = "linear",
                 stem: str | None = None, stem_channels: int | None = None) -> VLMConfig:
    """A small VLMConfig for a tokenizer and an image size; `stem`/`stem_channels` None take the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    s = PRESETS[preset]
    patch = patch_size or pick_patch_size(image_size)
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    n_patches = (image_size // patch) ** 2
    heads, v_heads = max(2, s["hidden"] // 32), max(2, s["vision_hidden"] // 32)
    return VLMConfig(
        lm=LMConfig(vocab_size=vocab_size, hidden_size=s["hidden"], num_layers=s["layers"], num_heads=heads,
                    num_kv_heads=heads // 2, max_seq_len=max(max_seq_len, n_patches + 128)),
        vision=VisionConfig(image_size=image_size, patch_size=patch, hidden_size=s["vision_hidden"],
                            num_layers=s["vision_layers"], num_heads=v_heads,
                            intermediate_size=4 * s["vision_hidden"], stem=stem or s["stem"],
                            stem_channels=stem_channels or s["stem_channels"]),
        image_pad_id=image_pad_id, num_patches=n_patches, projector=projector)


def cli_model_config(argv: list[str]) -> int:
    """`minimind-v model-config --tokenizer T --image-size 64 --out cfg.json [--preset small] [--projector mlp]`"""
    from .tokenizer import Tokenizer

    p = argparse.ArgumentParser(prog="minimind-v model-config",
                                description="write a small VLMConfig JSON for a tokenizer and an image size")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model (gives vocab size and image-pad id)")
    p.add_argument("--image-size", type=int, default=48, help="pixels per side the model sees")
    p.add_argument("--patch-size", type=int, help="default: 8-16 px, a 3x3 to 8x8 grid")
    p.add_argument("--preset", default="small", choices=tuple(PRESETS))
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--projector", default="linear", choices=("linear", "mlp"),
                   help="linear: one Linear (MiniMind2-V); mlp: LayerNorm -> Linear -> GELU -> Linear, a "
                        "nonlinear read of each patch vector (minimind-3v's kind)")
    p.add_argument("--stem", choices=STEMS,
                   help="conv (the small preset's): a 5x5 convolution with the max over each patch, for "
                        "objects that fall anywhere inside (or across) the patches; patch: CLIP's stride-p "
                        "convolution; both: the two summed. from-scratch-small scales the ViT's positions "
                        "by stem: conv x1, both x3, patch x10")
    p.add_argument("--stem-channels", type=int,
                   help="the conv stem's feature maps (the small preset's: 256); more keep more of each shape, and cost "
                        "encoder time (once, with the feature cache)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    tok = Tokenizer(a.tokenizer)
    cfg = model_config(len(tok), tok.image_pad_id, a.image_size, a.preset, a.patch_size, a.max_seq_len, a.projector,
                       a.stem, a.stem_channels)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(cfg.to_dict(), indent=2))
    print(f"wrote {a.out}: LM hidden {cfg.lm.hidden_size} x {cfg.lm.num_layers} layers, vocab {cfg.lm.vocab_size}; "
          f"ViT {cfg.vision.image_size} px / {cfg.vision.patch_size} px patches = {cfg.num_patches} per image, "
          f"hidden {cfg.vision.hidden_size} x {cfg.vision.num_layers} layer(s), {cfg.vision.stem} stem; "
          f"{cfg.projector} projector")
    return 0
