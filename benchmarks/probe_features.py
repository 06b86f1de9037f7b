"""What a frozen random ViT's patch vectors carry: fit small probes on them, score held-out pictures.

Not a speed benchmark: it answers "is the picture information there before the LM sees it?" for
the generated datasets, using the generator's own geometry as labels (`benchmarks/tuning.md` has
the numbers). The encoder is built as `train --recipe from-scratch-small` builds it (seeded, the
position embeddings scaled by --pos-scale, by default the recipe's value for the config's stem,
`recipes.POS_SCALE`).

    python benchmarks/probe_features.py --kind scenes --data S --model-config S/cfg.json
    python benchmarks/probe_features.py --kind objects --data O --model-config O/cfg.json

scenes: which glyph (1 of 8) sits in a patch, from that patch's vector (patches holding one);
objects: "is the red object on the left" and "what shape is the red object", from all 25 vectors,
"does this patch hold 10+ red pixels", from that patch's vector alone (what an attention
lookup of the red object needs; scored as balanced accuracy, the mean of the hit rates on the
patches with and without red, since ~8% of patches hold red), and the shape and the colour of
each object from the one vector of the patch under its centre (what a lookup that found the
object can read). That vector is first *de-positioned*: the mean vector of its patch index over
the fitting pictures is subtracted, because position embeddings scaled x10 otherwise swamp what
the picture adds; the probe without it is printed too.
Each probe: linear, and one hidden layer of 256; Adam, 1500 steps of 256; first N-1000 pictures
fit, the last 1000 score. `--stem conv` swaps in the conv stem (`model-config --stem conv`).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minimind_v.chat import load_pixels
from minimind_v.config import STEMS, VLMConfig
from minimind_v.recipes import POS_SCALE, ModelInit, apply_init
from minimind_v.vlm import MiniMindVLM


def patch_vectors(model, paths, size: int, n_patches: int) -> torch.Tensor:
    with torch.no_grad():
        out = [model.vision_encoder(load_pixels(paths[i:i + 200], size))[:, -n_patches:]   # no CLS
               for i in range(0, len(paths), 200)]
    return torch.cat(out)                                                 # (N, P, Dv)


def probe(x: torch.Tensor, y: torch.Tensor, classes: int, hidden: int, n_fit: int,
          balanced: bool = False) -> tuple[float, float]:
    """(fit accuracy, held-out accuracy) of a probe x (N, D) -> y (N,); `balanced`: the mean over
    classes of each class's hit rate."""
    torch.manual_seed(0)
    mean, std = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-6
    x = (x - mean) / std
    net = (torch.nn.Linear(x.shape[1], classes) if not hidden else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes)))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(1500):
        idx = torch.randint(n_fit, (256,))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = net(x).argmax(-1)

    def score(p, t):
        hit = (p == t).float()
        return torch.stack([hit[t == c].mean() for c in t.unique()]).mean().item() if balanced else hit.mean().item()
    return score(pred[:n_fit], y[:n_fit]), score(pred[n_fit:], y[n_fit:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=("scenes", "objects"), required=True)
    p.add_argument("--data", required=True, help="the generated folder")
    p.add_argument("--model-config", required=True)
    p.add_argument("--pictures", type=int, default=6000)
    p.add_argument("--pos-scale", type=float, help="default: the recipe's for the stem (recipes.POS_SCALE)")
    p.add_argument("--vision-hidden", type=int, help="override the ViT width (heads = width / 32)")
    p.add_argument("--stem", choices=STEMS, help="override the config's vision stem")
    p.add_argument("--stem-channels", type=int, help="override the conv stem's feature maps")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = json.loads(Path(a.model_config).read_text())
    if a.vision_hidden:
        w = a.vision_hidden
        cfg["vision"].update(hidden_size=w, intermediate_size=4 * w, num_heads=max(2, w // 32))
    if a.stem:
        cfg["vision"]["stem"] = a.stem
    if a.stem_channels:
        cfg["vision"]["stem_channels"] = a.stem_channels
    cfg = VLMConfig(**cfg)
    if a.pos_scale is None:
        a.pos_scale = POS_SCALE[cfg.vision.stem]
    torch.manual_seed(0)
    model = MiniMindVLM(cfg)
    apply_init(model, ModelInit(pos_scale=a.pos_scale, embed_std=0.1), log=lambda m: None)
    data, n, n_fit = Path(a.data), a.pictures, a.pictures - 1000
    paths = [str(data / "images" / f"train_{i:06d}.png") for i in range(n)]
    feats = patch_vectors(model, paths, cfg.vision.image_size, cfg.num_patches)
    probes = {}
    if a.kind == "scenes":                            # labels from the captions: "a teal 2 at row 2, column 4"
        grid = round(cfg.num_patches ** 0.5)
        lines = (data / "pretrain_train.jsonl").read_text().splitlines()[:n]
        glyph = torch.zeros(n, cfg.num_patches, dtype=torch.long)
        for i, line in enumerate(lines):
            text = json.loads(line)["conversations"][1]["content"]
            for ch, r, c in re.findall(r"(\w) at row (\d), column (\d)", text):
                glyph[i, (int(r) - 1) * grid + int(c) - 1] = 1 + "12345678AEHKMRTX".index(ch) % 8
        held = glyph > 0
        fit_rows = held[:n_fit].sum().item()
        x, y = feats[held], glyph[held] - 1
        probes["which glyph is in this patch"] = (x, y, 8, fit_rows, False)
    else:
        from minimind_v import objects
        meta = json.loads((data / "meta.json").read_text())           # the geometry is the generator's
        size = meta["image_size"]
        left, shape, centres = [], [], []       # centres: (picture, patch index, shape, colour) per object
        grid, scale = round(cfg.num_patches ** 0.5), cfg.vision.image_size / size
        for i in range(n):
            rng = random.Random(f"objects/{meta['seed']}/train/{i}")
            things = objects.random_objects(rng, size, meta["n_objects"])
            red = next(t for t in things if t.colour == "red")
            left.append(int(red.x < size / 2))
            shape.append(objects.SHAPES.index(red.shape))
            for t in things:
                row, col = (min(grid - 1, int(v * scale / cfg.vision.patch_size)) for v in (t.y, t.x))
                centres.append((i, row * grid + col, objects.SHAPES.index(t.shape), list(objects.COLOURS).index(t.colour)))
        flat = feats.flatten(1)
        probes["is the red object on the left"] = (flat, torch.tensor(left), 2, n_fit, False)
        probes["what shape is the red object"] = (flat, torch.tensor(shape), 3, n_fit, False)
        pic, idx, obj_shape, obj_colour = torch.tensor(centres).T
        under = feats[pic, idx]                                        # (N * objects, Dv): the patch under each centre
        depos = under - feats[:n_fit].mean(0)[idx]                     # minus its patch index's mean vector
        fit_rows = int((pic < n_fit).sum())                            # objects of the fitting pictures come first
        probes["object's shape, patch under it"] = (under, obj_shape, 3, fit_rows, False)
        probes["  shape, de-positioned"] = (depos, obj_shape, 3, fit_rows, False)
        probes["object's colour, patch under it"] = (under, obj_colour, len(objects.COLOURS), fit_rows, False)
        probes["  colour, de-positioned"] = (depos, obj_colour, len(objects.COLOURS), fit_rows, False)
        if size == cfg.vision.image_size:                              # not resized: patches map to pixels
            p_, g = cfg.vision.patch_size, size // cfg.vision.patch_size  # red pixels per patch, from the pictures
            red = torch.tensor(objects.COLOURS["red"], dtype=torch.uint8)
            counts = torch.stack([(torch.from_numpy(np.array(Image.open(path).convert("RGB"))) == red).all(-1)
                                  .reshape(g, p_, g, p_).sum((1, 3)).flatten() for path in paths])   # (N, P)
            probes["does this patch hold red"] = (feats.flatten(0, 1), (counts >= 10).long().flatten(), 2,
                                                  n_fit * cfg.num_patches, True)
    print(f"{a.kind}: {n} pictures ({n_fit} fit), ViT {cfg.vision.hidden_size} wide, positions x{a.pos_scale:g}")
    print(f"  vision stem: {cfg.vision.stem}" + (f", {cfg.vision.stem_channels} conv channels" if cfg.vision.stem != "patch" else ""))
    for name, (x, y, k, fit, balanced) in probes.items():
        for hidden in (0, 256):
            tr, te = probe(x, y, k, hidden, fit, balanced)
            print(f"  {name:32s} {'linear' if not hidden else 'hidden 256':>10}: fit {tr:.1%}  held out {te:.1%}")


if __name__ == "__main__":
    main()
