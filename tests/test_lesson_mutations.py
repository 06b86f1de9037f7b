"""The lesson tests catch the mistakes learners make.

Each mutant below is one plausible wrong version of one exercise (dtype handling, in-place
writes, off-by-one masks and shifts, RoPE pairing, ignore-index, a KV cache that forgets its
old entries, an iteration count that only works for short rows, ...). lessons/conftest.py's
`MINIMIND_V_GRADE=mutants:<this file>` mode runs every lesson test against the reference and
against the reference with one mutant in place of the name it mutates; this test asserts that
the reference passes everything and that every mutant fails at least one test.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minimind_v import attention, data, ffn, freeze, generate, image, lm, norm, rope, splice, train, vision, vlm

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    lesson: str
    name: str
    id: str
    obj: object
    why: str


MUTANTS: list[Mutant] = []


def mutant(lesson, name, why):
    def register(obj):
        MUTANTS.append(Mutant(lesson, name, f"{name}-{obj.__name__}", obj, why))
        return obj
    return register


# ------------------------------------------------------------------------------ 02 RMSNorm
@mutant("02-rmsnorm", "rms_norm", "mean of squares in bf16 (no upcast)")
def no_upcast(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@mutant("02-rmsnorm", "rms_norm", "eps forgotten")
def no_eps(x, weight, eps=1e-5):
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True))).to(x.dtype) * weight


@mutant("02-rmsnorm", "rms_norm", "eps outside the square root")
def eps_outside(x, weight, eps=1e-5):
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(x.dtype) * weight


@mutant("02-rmsnorm", "rms_norm", "not cast back: float32 out for bf16 in")
def not_cast_back(x, weight, eps=1e-5):
    xf = x.float() if x.dtype != torch.float64 else x
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)


@mutant("02-rmsnorm", "rms_norm", "normalises x in place")
def in_place(x, weight, eps=1e-5):
    return x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight


@mutant("02-rmsnorm", "rms_norm", "subtracts the mean (LayerNorm)")
def layer_norm(x, weight, eps=1e-5):
    return norm.rms_norm(x - x.mean(-1, keepdim=True), weight, eps)


@mutant("02-rmsnorm", "RMSNorm", "ignores its eps")
class DefaultEps(norm.RMSNorm):
    def __init__(self, dim, eps=1e-5):
        super().__init__(dim)


@mutant("02-rmsnorm", "RMSNorm", "weight is a buffer, not a Parameter")
class BufferWeight(torch.nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim))

    def forward(self, x):
        return norm.rms_norm(x, self.weight, self.eps)


# ------------------------------------------------------------------------------ 03 RoPE
@mutant("03-rope", "rope_tables", "interleaved angles (each angle twice in a row)")
def tables_interleaved(head_dim, max_len, theta=1e6, dtype=torch.float32):
    cos, sin = rope.rope_tables(head_dim, max_len, theta, torch.float64)
    idx = torch.arange(head_dim // 2).repeat_interleave(2)
    return cos[:, idx].to(dtype), sin[:, idx].to(dtype)


@mutant("03-rope", "rope_tables", "computed in float32")
def tables_float32(head_dim, max_len, theta=1e6, dtype=torch.float32):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    a = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    a = torch.cat([a, a], -1)
    return a.cos().to(dtype), a.sin().to(dtype)


@mutant("03-rope", "rope_tables", "frequency exponent i/hd instead of 2i/hd")
def tables_exponent(head_dim, max_len, theta=1e6, dtype=torch.float32):
    inv = 1.0 / theta ** (torch.arange(0, head_dim // 2, dtype=torch.float64) / head_dim)
    a = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    a = torch.cat([a, a], -1)
    return a.cos().to(dtype), a.sin().to(dtype)


@mutant("03-rope", "rotate_half", "(x2, -x1): the wrong sign")
def rotate_sign(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x2, -x1], -1)


@mutant("03-rope", "rotate_half", "interleaved pairs (2i, 2i+1)")
def rotate_interleaved(x):
    return torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)


@mutant("03-rope", "apply_rope", "interleaved pairing with rotate-half tables")
def apply_interleaved(q, k, cos, sin):
    def rot(x):
        return x * cos[None, :, None] + rotate_interleaved(x) * sin[None, :, None]
    return rot(q), rot(k)


@mutant("03-rope", "apply_rope", "x cos - rotate_half(x) sin")
def apply_minus(q, k, cos, sin):
    c, s = cos[None, :, None], sin[None, :, None]
    return q * c - rope.rotate_half(q) * s, k * c - rope.rotate_half(k) * s


@mutant("03-rope", "apply_rope", "only q rotated")
def apply_q_only(q, k, cos, sin):
    return rope.apply_rope(q, k, cos, sin)[0], k


# ------------------------------------------------------------------------------ 04 attention
@mutant("04-attention", "repeat_kv", "heads tiled (0 1 0 1) instead of repeated in place")
def repeat_tiled(x, n_rep):
    return x.repeat(1, 1, n_rep, 1)


@mutant("04-attention", "causal_mask", "ignores the cached offset")
def mask_no_offset(T, S, device=None):
    return torch.ones(T, S, dtype=torch.bool, device=device).tril()


@mutant("04-attention", "causal_mask", "off by one: the diagonal excluded")
def mask_off_by_one(T, S, device=None):
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T - 1)


@mutant("04-attention", "attend", "softmax in float32 even for float64 (not 'at least float32')")
def attend_float32(q, k, v, mask, dropout_p=0.0, training=False):
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).float()
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return (s.softmax(-1).to(q.dtype) @ v)


@mutant("04-attention", "attend", "result not cast back to q's dtype")
def attend_no_cast_back(q, k, v, mask, dropout_p=0.0, training=False):
    s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v.float()


@mutant("04-attention", "attend", "dropout also when training=False")
def attend_dropout_always(q, k, v, mask, dropout_p=0.0, training=False):
    return attention.attend(q, k, v, mask, dropout_p, training=dropout_p > 0)


@mutant("04-attention", "attend", "no dropout when training")
def attend_no_dropout(q, k, v, mask, dropout_p=0.0, training=False):
    return attention.attend(q, k, v, mask)


@mutant("04-attention", "attend", "-inf for masked scores (NaN on rows that see nothing)")
def attend_minus_inf(q, k, v, mask, dropout_p=0.0, training=False):
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return s.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype) @ v


@mutant("04-attention", "attend", "no 1/sqrt(hd) scale")
def attend_no_scale(q, k, v, mask, dropout_p=0.0, training=False):
    return attention.attend(q * math.sqrt(q.shape[-1]), k, v, mask, dropout_p, training)


@mutant("04-attention", "attend", "scales q in place")
def attend_in_place(q, k, v, mask, dropout_p=0.0, training=False):
    q.mul_(1.0)
    q.div_(1.0 + 1e-3)
    return attention.attend(q * (1.0 + 1e-3), k, v, mask, dropout_p, training)


@mutant("04-attention", "attend", "mask inverted")
def attend_inverted(q, k, v, mask, dropout_p=0.0, training=False):
    return attention.attend(q, k, v, ~mask | (mask.sum(-1, keepdim=True) == mask.shape[-1]), dropout_p, training)


class NoCopyCache(attention.KVCache):
    """Grows without copying its old entries."""

    def update(self, layer, k, v):
        if layer < len(self.keys) and self.lengths[layer] + k.shape[1] > self.keys[layer].shape[1]:
            B, _, n, hd = k.shape
            cap = 2 * self.keys[layer].shape[1]
            self.keys[layer] = k.new_zeros(B, cap, n, hd)
            self.values[layer] = v.new_zeros(B, cap, n, hd)
        return super().update(layer, k, v)


class CatCache(attention.KVCache):
    """torch.cat on every step: right values, the history copied each time."""

    def update(self, layer, k, v):
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
            self.lengths.append(k.shape[1])
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], 1)
            self.values[layer] = torch.cat([self.values[layer], v], 1)
            self.lengths[layer] += k.shape[1]
        return self.keys[layer], self.values[layer]


class WholeBufferCache(attention.KVCache):
    """Returns the whole buffer, empty slots included."""

    def update(self, layer, k, v):
        super().update(layer, k, v)
        return self.keys[layer], self.values[layer]


class GrowByNeedCache(attention.KVCache):
    """Grows to exactly what is needed: a copy on every step once full."""

    def update(self, layer, k, v):
        if layer < len(self.keys) and self.lengths[layer] + k.shape[1] > self.keys[layer].shape[1]:
            past = self.lengths[layer]
            for store in (self.keys, self.values):
                bigger = store[layer].new_empty(k.shape[0], past + k.shape[1], *k.shape[2:])
                bigger[:, :past] = store[layer][:, :past]
                store[layer] = bigger
        return super().update(layer, k, v)


for _cls, _why in ((NoCopyCache, "grows without copying its old entries"), (CatCache, "torch.cat every step"),
                   (WholeBufferCache, "returns the empty slots too"), (GrowByNeedCache, "grows by one, not x2")):
    MUTANTS.append(Mutant("04-attention", "KVCache", f"KVCache-{_cls.__name__}", _cls, _why))


# ------------------------------------------------------------------------------ 05 transformer
class SiluOnUp(ffn.SwiGLU):
    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * F.silu(self.up_proj(x)))


class GeluGate(ffn.SwiGLU):
    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class PostNorm(lm.Block):
    def forward(self, h, cos, sin, mask, kv_cache=None):
        h = self.attn_norm(h + self.attn(h, cos, sin, mask, kv_cache))
        return self.ffn_norm(h + self.ffn(h))


class OneNorm(lm.Block):
    def forward(self, h, cos, sin, mask, kv_cache=None):
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, kv_cache)
        return h + self.ffn(self.attn_norm(h))


class NoOffsetLM(lm.MiniMindLM):
    """Positions restart at 0 on every call (ignores kv_cache.length for RoPE)."""

    def forward(self, input_ids, kv_cache=None, attention_mask=None):
        h = self.embed(input_ids)
        T = h.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        past = kv_cache.length if kv_cache is not None else 0
        mask = attention.build_mask(T, past + T, None)
        for block in self.layers:
            h = block(h, cos, sin, mask, kv_cache)
        return self.lm_head(self.norm(h))


class UntiedLM(lm.MiniMindLM):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.lm_head.weight = torch.nn.Parameter(self.embed_tokens.weight.detach().clone())


def loss_no_shift(logits, labels, ignore_index=-100):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)


def loss_counts_masked(logits, labels, ignore_index=-100):
    t = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), t.flatten().clamp(min=0), reduction="none")
    return (ce * (t.flatten() != ignore_index)).sum() / t.numel()


def loss_in_input_dtype(logits, labels, ignore_index=-100):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=ignore_index)


for _name, _obj, _why in (("SwiGLU", SiluOnUp, "silu on up, not on the gate"), ("SwiGLU", GeluGate, "GELU gate"),
                          ("Block", PostNorm, "post-norm"), ("Block", OneNorm, "one norm for both sub-layers"),
                          ("MiniMindLM", NoOffsetLM, "RoPE positions ignore the cache"),
                          ("MiniMindLM", UntiedLM, "untied output layer"),
                          ("lm_loss", loss_no_shift, "no shift"), ("lm_loss", loss_counts_masked, "-100 counted in the mean"),
                          ("lm_loss", loss_in_input_dtype, "bf16 loss, not float32")):
    MUTANTS.append(Mutant("05-transformer", _name, f"{_name}-{_obj.__name__}", _obj, _why))
    if _name == "lm_loss":
        MUTANTS.append(Mutant("10-training", _name, f"{_name}-{_obj.__name__}", _obj, _why))


# ------------------------------------------------------------------------------ 06 generation
@mutant("06-generation", "apply_repetition_penalty", "penalised once per occurrence")
def penalty_per_occurrence(logits, seen, penalty):
    out = logits.clone()
    for b in range(seen.shape[0]):
        for t in seen[b].tolist():
            out[b, t] = out[b, t] / penalty if out[b, t] > 0 else out[b, t] * penalty
    return out


@mutant("06-generation", "apply_repetition_penalty", "in place on the input")
def penalty_in_place(logits, seen, penalty):
    logits.copy_(generate.apply_repetition_penalty(logits, seen, penalty))
    return logits


@mutant("06-generation", "top_k_filter", "ties with the k-th dropped")
def top_k_no_ties(logits, k):
    idx = logits.topk(k, -1).indices
    return torch.full_like(logits, float("-inf")).scatter(1, idx, logits.gather(1, idx))


@mutant("06-generation", "top_p_filter", "stops before the token that reaches p")
def top_p_short(logits, p):
    s, order = logits.sort(-1, descending=True)
    probs = s.softmax(-1)
    drop = probs.cumsum(-1) > p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


@mutant("06-generation", "next_token", "samples with the global random state")
def next_token_global(logits, seen, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, generator=None):
    return generate.next_token(logits, seen, temperature, top_k, top_p, repetition_penalty, None)


@mutant("06-generation", "generate", "recomputes the whole sequence (no cache)")
def generate_no_cache(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                      repetition_penalty=1.0, eos_id=None, seed=None):
    if input_ids.shape[1] + max_new_tokens > model.max_seq_len:
        raise ValueError("too long")
    ids = input_ids
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, generate.next_token(model(ids)[:, -1], ids, temperature, top_k, top_p,
                                                  repetition_penalty, g)[:, None]], 1)
    return ids


@mutant("06-generation", "generate", "finished rows do not keep emitting eos")
def generate_not_sticky(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, eos_id=None, seed=None):
    out = generate.generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            None, seed=seed)
    if eos_id is not None and out.shape[0] == 1:
        hit = (out[0, input_ids.shape[1]:] == eos_id).nonzero()
        if len(hit):
            return out[:, :input_ids.shape[1] + int(hit[0]) + 1]
    return out


@mutant("06-generation", "generate", "context limit off by one (>=)")
def generate_limit_off_by_one(model, input_ids, max_new_tokens, *args, **kwargs):
    if input_ids.shape[1] + max_new_tokens >= model.max_seq_len:
        raise ValueError("too long")
    return generate.generate(model, input_ids, max_new_tokens, *args, **kwargs)


# ------------------------------------------------------------------------------ 07 vision
@mutant("07-vision-transformer", "quick_gelu", "the exact GELU")
def exact_gelu(x):
    return F.gelu(x)


@mutant("07-vision-transformer", "patchify", "channel-last patches")
def patchify_channel_last(pixels, patch_size):
    B, C, H, W = pixels.shape
    if H % patch_size or W % patch_size:
        raise ValueError("size")
    p = patch_size
    return pixels.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, C * p * p)


@mutant("07-vision-transformer", "patchify", "column-major patch order")
def patchify_column_major(pixels, patch_size):
    return vision.patchify(pixels.transpose(-1, -2), patch_size) if pixels.shape[-1] % patch_size == 0 and \
        pixels.shape[-2] % patch_size == 0 else vision.patchify(pixels, patch_size)


@mutant("07-vision-transformer", "attention", "softmax over the queries (dim -2)")
def attention_wrong_dim(q, k, v, need_weights=False):
    probs = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-2)
    return probs @ v, probs if need_weights else None


@mutant("07-vision-transformer", "attention", "no scale")
def attention_no_scale(q, k, v, need_weights=False):
    probs = (q @ k.transpose(-2, -1)).softmax(-1)
    return probs @ v, probs if need_weights else None


class PostLNBlock(vision.VisionBlock):
    def forward(self, x, need_weights=False):
        a, probs = self.attn(x, need_weights)
        x = self.ln_1(x + a)
        return self.ln_2(x + self.mlp(x)), probs


@mutant("07-vision-transformer", "preprocess", "bilinear resize")
def preprocess_bilinear(img, size=224):
    import numpy as np
    from PIL import Image
    rgb = image.to_rgb(img) if hasattr(image, "to_rgb") else img.convert("RGB")
    w, h = rgb.size
    s = size / min(w, h)
    rgb = rgb.resize((max(size, int(w * s)), max(size, int(h * s))), Image.BILINEAR)
    left, top = (rgb.size[0] - size) // 2, (rgb.size[1] - size) // 2
    x = np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.float64) / 255
    x = (x.astype(np.float32) - np.array(image.CLIP_MEAN, np.float32)) / np.array(image.CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


@mutant("07-vision-transformer", "preprocess", "transparent pixels on black")
def preprocess_black(img, size=224):
    return image.preprocess(img.convert("RGB"), size)


MUTANTS.append(Mutant("07-vision-transformer", "VisionBlock", "VisionBlock-PostLN", PostLNBlock, "post-LN"))


# ------------------------------------------------------------------------------ 08 splice
class NoBiasProjector(vlm.VisionProjector):
    def __init__(self, in_dim=768, out_dim=512, kind="linear"):
        super().__init__(in_dim, out_dim, kind)
        if kind == "linear":
            self.vision_proj = torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim, bias=False))


MUTANTS.append(Mutant("08-projector-and-splice", "VisionProjector", "VisionProjector-NoBias", NoBiasProjector, "no bias"))


@mutant("08-projector-and-splice", "find_matches", "one window short (T - L)")
def matches_short(input_ids, image_ids):
    m = splice.find_matches(input_ids, image_ids)
    return m[:, :-1] if m.shape[1] else m


@mutant("08-projector-and-splice", "splice_loop", "also writes into h")
def splice_loop_in_place(input_ids, h, image_embeds, image_ids):
    out = splice.splice_loop(input_ids, h, image_embeds, image_ids)
    h.copy_(out)
    return out


@mutant("08-projector-and-splice", "splice_loop", "overlapping windows all replaced (the seed)")
def splice_loop_overlapping(input_ids, h, image_embeds, image_ids):
    out, L, N = h.clone(), len(image_ids), image_embeds.shape[1]
    m = splice.find_matches(input_ids, image_ids)
    for b in range(h.shape[0]):
        for n, s in enumerate(m[b].nonzero().flatten().tolist()[:N]):
            out[b, s:s + L] = image_embeds[b, n]
    return out


def _select_fixed(steps):
    def select_runs(matches, L):
        B, W = matches.shape
        pos = torch.arange(W)
        first = torch.where(matches, pos, W).flip(-1).cummin(-1).values.flip(-1)
        first = torch.cat([first, first.new_full((B, L + 1), W)], 1)
        jump = first[:, L:L + W + 1]
        kept = torch.zeros(B, W + 1, dtype=torch.bool).scatter_(1, first[:, :1], True)
        for _ in range(steps):
            kept = kept | torch.zeros_like(kept).scatter_reduce_(1, jump, kept, reduce="amax")
            jump = jump.gather(1, jump)
        return kept[:, :W]
    return select_runs


select_runs_fixed_steps = _select_fixed(4)          # enough for T = 640 with L = 196 ... and for short tests
MUTANTS.append(Mutant("08-projector-and-splice", "select_runs", "select_runs-fixed_4_steps", select_runs_fixed_steps,
                      "pointer jumping with a fixed number of steps (right for short rows only)"))


@mutant("08-projector-and-splice", "select_runs", "every match kept (overlaps)")
def select_all(matches, L):
    return matches.clone()


@mutant("08-projector-and-splice", "splice", "writes into h")
def splice_in_place(input_ids, h, image_embeds, image_ids):
    out = splice.splice(input_ids, h, image_embeds, image_ids)
    with torch.no_grad():
        h.copy_(out)
    return out


@mutant("08-projector-and-splice", "splice", "images detached (no gradient to the projector)")
def splice_detached(input_ids, h, image_embeds, image_ids):
    return splice.splice(input_ids, h, image_embeds.detach(), image_ids)


@mutant("08-projector-and-splice", "splice", "host sync (.tolist())")
def splice_host_sync(input_ids, h, image_embeds, image_ids):
    return splice.splice_loop(input_ids, h, image_embeds, image_ids)


# ------------------------------------------------------------------------------ 09 data
@mutant("09-data", "truncate", "cuts through an image")
def truncate_through(ids, target, max_length, image_pad_id, num_patches):
    ids, target = ids[:max_length], target[:max_length]
    return ids, target, ids.count(image_pad_id) // num_patches


@mutant("09-data", "encode_sample", "labels shifted by one")
def encode_shifted(tokenizer, messages, max_length, num_patches):
    ids, labels, n = data.encode_sample(tokenizer, messages, max_length, num_patches)
    return ids, labels[1:] + [-100], n


@mutant("09-data", "collate", "labels padded with pad_id")
def collate_pad_labels(batch, pad_id=0):
    out = data.collate(batch, pad_id)
    out["labels"] = out["labels"].masked_fill(~out["attention_mask"], pad_id)
    return out


@mutant("09-data", "collate", "attention mask as 0/1 longs")
def collate_long_mask(batch, pad_id=0):
    out = data.collate(batch, pad_id)
    out["attention_mask"] = out["attention_mask"].long()
    return out


# ------------------------------------------------------------------------------ 10 training
@mutant("10-training", "lr_at", "warmup from 0 (step / warmup)")
def lr_warmup_from_zero(step, total_steps, peak, warmup_steps=0, min_ratio=0.1):
    if step < warmup_steps:
        return peak * step / warmup_steps
    return train.lr_at(step, total_steps, peak, warmup_steps, min_ratio)


@mutant("10-training", "lr_at", "cosine to 0, not to min_ratio * peak")
def lr_to_zero(step, total_steps, peak, warmup_steps=0, min_ratio=0.1):
    return train.lr_at(step, total_steps, peak, warmup_steps, 0.0)


@mutant("10-training", "param_groups", "norm gains decayed too")
def groups_decay_all(model, weight_decay):
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]


@mutant("10-training", "param_groups", "frozen parameters included")
def groups_with_frozen(model, weight_decay):
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


@mutant("10-training", "apply_freeze", "leaves the other parameters trainable")
def freeze_nothing_else(model, groups):
    names = freeze.apply_freeze(model, groups)
    for p in model.parameters():
        p.requires_grad_(True)
    return names


@mutant("10-training", "epoch_batches", "the same shuffle every epoch")
def batches_same_every_epoch(n_items, batch_size, epoch, seed, rank, world):
    return train.epoch_batches(n_items, batch_size, 0, seed, rank, world)


# ------------------------------------------------------------------------------ 11 fused RMSNorm
@mutant("11-fused-rmsnorm-kernel", "rms_norm_backward", "the mean term forgotten")
def backward_no_mean(grad_y, x, weight, rstd):
    r = rstd.unsqueeze(-1).to(torch.promote_types(x.dtype, torch.float32))
    dx = (r * grad_y * weight).to(x.dtype)
    dw = (grad_y * x * r).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw


@mutant("11-fused-rmsnorm-kernel", "rms_norm_backward", "dw of the last row only")
def backward_dw_last_row(grad_y, x, weight, rstd):
    dx, _ = norm.rms_norm_backward(grad_y, x, weight, rstd)
    r = rstd.unsqueeze(-1)
    return dx, (grad_y * x * r).reshape(-1, x.shape[-1])[-1].to(weight.dtype)


@mutant("11-fused-rmsnorm-kernel", "rms_norm_forward", "rstd in bf16 for bf16 input")
def forward_low_rstd(x, weight, eps=1e-5):
    y, rstd = norm.rms_norm_forward(x, weight, eps)
    return y, rstd.to(x.dtype)


class SavesY(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        y, rstd = norm.rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd, _ = ctx.saved_tensors
        return (*norm.rms_norm_backward(grad_y, x, weight, rstd), None)


MUTANTS.append(Mutant("11-fused-rmsnorm-kernel", "RMSNormFunction", "RMSNormFunction-SavesY", SavesY, "saves y too"))


# ------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{mutant id or "reference": {test id: outcome}} from one run of lessons 02-11."""
    report = tmp_path_factory.mktemp("mutants") / "report.xml"
    env = dict(os.environ, MINIMIND_V_GRADE=f"mutants:{Path(__file__).resolve()}", MINIMIND_V_LEARNER="0",
               PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    lessons = sorted(str(p) for p in (ROOT / "lessons").glob("[01][0-9]-*") if p.name[:2] != "01")
    proc = subprocess.run([sys.executable, "-m", "pytest", *lessons, "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = defaultdict(dict)
    for case in ET.parse(report).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        failed = any(child.tag in ("failure", "error") for child in case)
        msg = next((c.get("message", "") for c in case if c.tag in ("failure", "error")), "")
        results[props.get("mutant", "?")][case.get("name")] = (failed, msg.splitlines()[0] if msg else "")
    return results


def test_the_reference_passes_every_lesson_test(outcomes):
    failed = {t: m for t, (f, m) in outcomes["reference"].items() if f}
    assert outcomes["reference"] and not failed, f"the reference fails: {failed}"


@pytest.mark.parametrize("m", MUTANTS, ids=lambda m: m.id)
def test_the_lesson_tests_catch(outcomes, m):
    runs = outcomes.get(m.id, {})
    assert runs, f"no lesson test calls ex.{m.name} in lessons/{m.lesson}"
    assert any(f for f, _ in runs.values()), f"{m.lesson} {m.name} ({m.why}) passes every lesson test: {sorted(runs)}"
