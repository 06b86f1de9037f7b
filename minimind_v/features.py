"""The vision-feature cache: run the frozen encoder once per image, then read its output from disk.

Where it sits: between the dataset and the training loop, for stages whose vision encoder is
frozen (all of MiniMind-V's). The encoder's output for an image never changes while its weights
do not, so recomputing it every epoch is wasted work: on the real model the ViT-B/16 forward is
most of a pretraining step. `FeatureCache.build` runs it once per distinct image and writes the
features to a memory-mapped file; `CachedFeatures` wraps a dataset so that its items carry those
features instead of decoded pictures, and the model takes them through `image_features=`.

The cache is keyed by a fingerprint of the encoder's weights and of the preprocessing settings,
so a cache made by another encoder (or for another image size) is rebuilt, never trusted.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

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
    def fingerprint_of(encoder: nn.Module, **settings) -> str:
        """A hash of the encoder's weights and of the preprocessing `settings` (image size, ...)."""
        h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
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
            wanted = {str(p) for sample in getattr(dataset, "samples", []) for p in sample[2]}
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


class CachedFeatures(torch.utils.data.Dataset):
    """`dataset` with each item's pictures replaced by their cached encoder features.

    Items: the dataset's `input_ids`, `labels`, `image_paths`, plus `image_features (N, P, Dv)`;
    no pixels are decoded. The wrapped dataset is not changed: a shallow copy reads with
    `load_pixels=False`.
    """

    def __init__(self, dataset, cache: FeatureCache):
        self.dataset = copy.copy(dataset)
        if hasattr(self.dataset, "load_pixels"):
            self.dataset.load_pixels = False              # items: ids, labels, image paths only
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        item.pop("pixel_values", None)
        item["image_features"] = self.cache.lookup([item["image_paths"]])[0]    # (N, P, Dv)
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The items of a batch at once (the DataLoader calls this when it exists): one read of the
        cache for all their pictures instead of one per item; the same items as `__getitem__`."""
        items = [dict(self.dataset[i]) for i in indices]
        paths = [p for item in items for p in item["image_paths"]]
        feats = torch.from_numpy(self.cache.array[[self.cache.row[p] for p in paths]])   # (n, P, Dv), n may be 0
        start = 0
        for item in items:
            item.pop("pixel_values", None)
            n = len(item["image_paths"])
            item["image_features"] = feats[start:start + n]                   # (N, P, Dv)
            start += n
        return items


def collate_features(collate):
    """A collate function for `CachedFeatures` items: `collate` + image_features (B, Nmax, P, Dv)."""
    def collate_with_features(items: list[dict]) -> dict:
        feats = [it.pop("image_features") for it in items]
        batch = collate(items)
        # (B, Nmax, P, Dv): zeros where a row has fewer pictures (one copy, as `collate`'s ids)
        batch["image_features"] = pad_sequence(feats, batch_first=True) if feats else torch.zeros(0, 0, 0, 0)
        batch["pixel_values"] = None
        return batch
    return collate_with_features


def with_feature_cache(model, dataset, collate, folder: Path, is_main: bool = True, world: int = 1, log=print):
    """(dataset, collate) that serve `model`'s frozen-encoder features from the cache in `folder`.

    The main process builds the cache (or finds it complete and made by these very weights);
    the others wait for it. The fingerprint covers the encoder's weights and the image size.
    """
    fp = FeatureCache.fingerprint_of(model.vision_encoder, image_size=getattr(dataset, "image_size", None))
    if is_main:
        FeatureCache.build(folder, model.image_features, dataset, fp, log=log)
    if world > 1:
        torch.distributed.barrier()
    cache = FeatureCache(folder)
    if cache.fingerprint != fp:
        raise ValueError(f"{folder}: the feature cache was made by another encoder or other settings")
    return CachedFeatures(dataset, cache), collate_features(collate)
