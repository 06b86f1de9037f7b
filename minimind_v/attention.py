"""Causal self-attention with grouped-query heads (GQA) and a KV cache, written out by hand.

Per layer, for tokens x (B, T, D):
    q = x Wq -> (B, T, H, hd)        H = 8 query heads
    k = x Wk -> (B, T, H_kv, hd)     H_kv = 2 key/value heads, each shared by H / H_kv queries
    v = x Wv -> (B, T, H_kv, hd)
    q, k = RoPE(q, k)
    out = softmax(q k^T / sqrt(hd) + mask) v  -> (B, T, H*hd) -> Wo

GQA stores 4x fewer keys/values than full multi-head attention (the KV cache shrinks
accordingly); `repeat_kv` copies each K/V head to the queries of its group before the matmul
(the plain statement, used with `attend`). The model's hand-written path gets the same result
without the copy by folding the query heads of a group into the rows of one matmul
(`attend_grouped` for padding and cached decoding, `causal_attend_blocked` for plain causal).

q/k-norm (minimind-3v, Qwen3; `LMConfig.qk_norm`): every head vector of q and of k (hd numbers) is
RMS-normalised before RoPE, with one learned weight (hd,) for all query heads (`q_norm`) and one for
all key heads (`k_norm`). The scores q.k / sqrt(hd) then stay bounded whatever the size of x Wq,
which keeps the softmax away from one-hot saturation in deep or long training. With qk_norm off
nothing is computed for it.

Masks: the causal mask lets the query at absolute position p see keys 0..p. With a cache
holding `past` earlier tokens, the T new queries sit at positions past..past+T-1, so the
mask is `tril(ones(T, past+T), diagonal=past)`. An optional padding mask (B, S) hides pad keys.
The softmax runs in float32.

The module reads in two parts. First the plain statement that lesson 04 teaches: `repeat_kv`,
the masks, `attend` (softmax(q k^T / sqrt(hd) + mask) v) and the `KVCache`. Then the tuned paths
that `Attention.forward` actually runs, each proven equal to repeat_kv + `attend` by the tests:

    attn_impl="manual", no padding, no cache (training, prefill)  -> causal_attend_blocked
    attn_impl="manual", padding or tokens after a cache (decode)  -> attend_grouped
    attn_impl="sdpa"                                              -> sdpa (F.scaled_dot_product_attention)

Without padding the model passes mask=None ("just causal"): then the blocked path skips the
masked half, and so does the fused kernel (is_causal).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .linear import Linear, shared_input_linear
from .norm import RMSNorm
from .rope import apply_rope


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, H_kv, hd) -> (B, T, H_kv * n_rep, hd): head j of the result is kv head j // n_rep."""
    if n_rep == 1:
        return x
    B, T, n_kv, hd = x.shape
    return x[:, :, :, None, :].expand(B, T, n_kv, n_rep, hd).reshape(B, T, n_kv * n_rep, hd)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i (absolute position S-T+i) may attend to key j."""
    past = S - T
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)


def build_mask(T: int, S: int, attention_mask: torch.Tensor | None, device=None) -> torch.Tensor:
    """Causal mask combined with an optional padding mask (B, S) of 1 = token, 0 = pad.

    Returns bool (1, 1, T, S) or (B, 1, T, S), True = may attend.
    """
    mask = causal_mask(T, S, device)[None, None]                     # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, "
                             f"but there are {S} keys (cached + new)")
        mask = mask & attention_mask.bool()[:, None, None, :]        # (B, 1, T, S)
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Hand-written attention. q (B, H, T, hd), k/v (B, H, S, hd), mask bool (.., T, S) -> (B, H, T, hd)."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)       # (B, H, T, S)
    # A large finite negative (not -inf) keeps rows that see no key at all (left pads) NaN-free.
    # In place: the matmul's backward needs q and k, not the scores, so overwriting them is safe.
    scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    # softmax in at least float32 (bf16 scores are upcast inside the kernel; float64 stays float64)
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return probs @ v                                                       # (B, H, T, hd)


class KVCache:
    """Keys and values of every layer for the tokens seen so far.

    Storage per layer is a preallocated buffer (B, capacity, H_kv, hd) that new tokens are
    written into in place; when it is full, capacity doubles (one copy, amortised O(1) per
    token), so a decode step never re-copies the whole history as `torch.cat` would.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    @property
    def length(self) -> int:
        """Number of cached positions (of layer 0; all layers agree after a full forward)."""
        return self.lengths[0] if self.lengths else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, T, H_kv, hd) for `layer`; return all keys/values (B, past+T, H_kv, hd)."""
        B, T, n_kv, hd = k.shape
        if layer == len(self.keys):                      # first call for this layer
            cap = max(16, T)
            self.keys.append(k.new_empty(B, cap, n_kv, hd))
            self.values.append(v.new_empty(B, cap, n_kv, hd))
            self.lengths.append(0)
        past = self.lengths[layer]
        if past + T > self.keys[layer].shape[1]:         # grow: double the capacity
            cap = max(2 * self.keys[layer].shape[1], past + T)
            for store in (self.keys, self.values):
                bigger = store[layer].new_empty(B, cap, n_kv, hd)
                bigger[:, :past] = store[layer][:, :past]
                store[layer] = bigger
        self.keys[layer][:, past:past + T] = k
        self.values[layer][:, past:past + T] = v
        self.lengths[layer] = past + T
        return self.keys[layer][:, :past + T], self.values[layer][:, :past + T]


# ---------------------------------------------------------------------------------------------
# The tuned paths (the same results as repeat_kv + attend, less memory traffic)
# ---------------------------------------------------------------------------------------------


def softmax_scores(scores: torch.Tensor) -> torch.Tensor:
    """`scores.softmax(-1, dtype=float32).to(scores.dtype)` (at least float32 inside, the scores'
    dtype out) without the float32 copy: for bf16/fp16 scores torch's softmax kernel already
    computes in float32 and rounds once, giving the same numbers (`tests/test_attention.py`); its
    backward then works on the rounded probabilities, as the matmul after it does."""
    if scores.dtype in (torch.bfloat16, torch.float16):
        return scores.softmax(dim=-1)
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def causal_attend_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 128,
                          dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Plain causal GQA attention (T == S, no padding, no cache) that skips the masked half and
    never copies K/V per query head. q (B, T, H, hd), k/v (B, T, H_kv, hd) -> (B, T, H, hd).

    Two ideas, both exact (same result as repeat_kv + `attend` with `causal_mask(T, T)`):
    - Skip the masked half. Queries go in blocks of `block` positions. Block [a, b) may only see
      keys [0, b): every score to the right of b would be masked, so it is not computed. The block
      is exactly "b - a new tokens after a cache of a", so its mask is `causal_mask(b - a, b)`. For
      T = 640, block = 128 this computes 60% of the T x T scores (flash attention skips masked
      tiles the same way).
    - GQA by grouping queries instead of repeating keys. The r = H / H_kv query heads that share a
      K/V head become extra rows of one matrix product with that head: per group, the block's
      queries are a (C * r, hd) matrix (rows ordered position-major: t0 rep0, t0 rep1, ...), so K
      and V are read once per group and never expanded to H heads.
    """
    B, T, H, hd = q.shape
    n_kv = k.shape[2]
    r = H // n_kv
    # (B, H_kv, T, r, hd): one copy, after which a block of positions is a contiguous (C * r, hd)
    # matrix per group; split (not slicing) gives the blocks, so the backward is one concatenation
    q = (q * (1.0 / math.sqrt(hd))).view(B, T, n_kv, r, hd).permute(0, 2, 1, 3, 4).contiguous()
    k = k.transpose(1, 2).contiguous()                                     # (B, H_kv, T, hd)
    v = v.transpose(1, 2).contiguous()
    outs = []
    for a, q_blk in zip(range(0, T, block), q.split(block, dim=2)):
        C = q_blk.shape[2]
        b = a + C
        # the mask as an additive bias (0 = may attend, -inf = may not), added by the matmul itself
        # (baddbmm: bias + q k^T in one kernel); unlike masked_fill it costs nothing in backward
        bias = torch.zeros(C * r, b, dtype=q.dtype, device=q.device)                 # (C*r, b)
        bias.masked_fill_(~causal_mask(C, b, q.device).repeat_interleave(r, dim=0), float("-inf"))
        scores = torch.baddbmm(bias, q_blk.reshape(B * n_kv, C * r, hd),              # (B*H_kv, C*r, b)
                               k[:, :, :b].reshape(B * n_kv, b, hd).transpose(1, 2))
        probs = softmax_scores(scores)
        probs = F.dropout(probs, p=dropout_p, training=training)
        o = torch.bmm(probs, v[:, :, :b].reshape(B * n_kv, b, hd))                    # (B*H_kv, C*r, hd)
        outs.append(o.view(B, n_kv, C, r, hd))
    out = torch.cat(outs, dim=2)                                                     # (B, H_kv, T, r, hd)
    return out.permute(0, 2, 1, 3, 4).reshape(B, T, H, hd)                          # head h = kv * r + rep


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """`attend` for GQA without repeating K/V (same result as repeat_kv + `attend`).
    q (B, T, H, hd), k/v (B, S, H_kv, hd), mask bool (T, S) or (B or 1, 1, T, S) -> (B, T, H, hd);
    mask None = every query sees every key (one new token after a cache, no padding).

    The r = H / H_kv query heads that share a K/V head become r * T rows of one product with it,
    so the keys are read once per group, never copied to H heads. This matters for decoding: each
    step attends one new query per head to the whole cache, and `repeat_kv` would copy that cache
    (r times larger) in every layer, every step.
    """
    B, T, H, hd = q.shape
    S, n_kv = k.shape[1], k.shape[2]
    r = H // n_kv
    q = (q * (1.0 / math.sqrt(hd))).view(B, T, n_kv, r, hd).permute(0, 2, 3, 1, 4)    # (B, H_kv, r, T, hd)
    q = q.reshape(B, n_kv, r * T, hd)                                      # rows: rep-major, then t
    k, v = k.transpose(1, 2), v.transpose(1, 2)                            # (B, H_kv, S, hd), views
    scores = (q @ k.transpose(-2, -1)).view(B, n_kv, r, T, S)              # (B, H_kv, r, T, S)
    if mask is not None:
        mask = mask if mask.dim() == 2 else mask[:, :, None]               # (T, S) or (B|1, 1, 1, T, S)
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    probs = softmax_scores(scores)
    probs = F.dropout(probs, p=dropout_p, training=training)
    out = probs.view(B, n_kv, r * T, S) @ v                                # (B, H_kv, r*T, hd)
    return out.view(B, n_kv, r, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H, hd)   # head = kv*r + rep


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         dropout_p: float = 0.0) -> torch.Tensor:
    """The same through F.scaled_dot_product_attention. mask None = plain causal: then the fused
    kernel can skip the masked half itself (is_causal) instead of reading a (T, S) mask."""
    T, S = q.shape[-2], k.shape[-2]
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if mask is None and T == 1:               # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if mask is None:                          # a chunk after a cache: is_causal would align top-left
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# ----------------------------------------------------------------------------- opt-in capture
def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The probabilities softmax(q k^T / sqrt(hd) + mask), written plainly, for inspection only.
    q (B, T, H, hd), k (B, S, H_kv, hd), mask bool (T, S) / (B|1, 1, T, S) or None (causal) -> (B, H, T, S)."""
    T, S = q.shape[1], k.shape[1]
    k = repeat_kv(k, q.shape[2] // k.shape[2])                                    # (B, S, H, hd)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])
    mask = causal_mask(T, S, q.device) if mask is None else mask
    # as `attend`: a large finite negative, so a row that sees no key (a left pad) stays finite
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=-1)


class capture_attention:
    """`with capture_attention(model) as maps:` each Attention layer of `model` appends the
    probabilities of every forward to `maps[layer_idx]` (a list of (B, H, T, S) float32 tensors).

    Opt-in and read-only: outside the block `Attention.record` is None and the forward is the
    usual one. Used by `report.py` for attention heatmaps; the weights are recomputed from the
    layer's own q and k (after RoPE, with the layer's mask), whichever attention path runs.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]

    def __enter__(self) -> dict[int, list]:
        maps = {}
        for layer in self.layers:
            layer.record = maps.setdefault(layer.layer_idx, [])
        return maps

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.record = None
        return False


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.n_rep = self.n_heads // self.n_kv
        self.impl = cfg.attn_impl
        self.dropout = cfg.dropout
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:                                          # one RMSNorm over hd, shared by all heads
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.norm_impl)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.norm_impl)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.record: list | None = None     # set by `capture_attention` only

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, D) -> q (B, T, H, hd), k, v (B, T, H_kv, hd), q and k rotated to their positions."""
        B, T, _ = x.shape
        q, k, v = shared_input_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.hd)                  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv, self.hd)                     # (B, T, H_kv, hd)
        v = v.view(B, T, self.n_kv, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)                # per head, over hd
        q, k = apply_rope(q, k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, D); cos/sin (T, hd) for these tokens' positions; mask bool (B or 1, 1, T, S)
        from `build_mask` (built once per forward by the model, shared by all layers), or None
        for the plain causal mask (no padding)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)        # (B, S, H_kv, hd), S = past + T
        if self.record is not None:                                 # opt-in inspection, see capture_attention
            self.record.append(attention_weights(q, k, mask).detach())
        p = self.dropout if self.training else 0.0
        if self.impl == "manual" and mask is None and k.shape[1] == T:    # plain causal, no cache
            out = causal_attend_blocked(q, k, v, dropout_p=p, training=self.training)   # (B, T, H, hd)
        elif self.impl == "manual":                                 # padding, or tokens after a cache
            if mask is None and T > 1:                              # one new token sees the whole cache
                mask = causal_mask(T, k.shape[1], x.device)         # (T, S)
            out = attend_grouped(q, k, v, mask, p, self.training)   # (B, T, H, hd)
        else:
            q = q.transpose(1, 2)                                   # (B, H, T, hd)
            k = repeat_kv(k, self.n_rep).transpose(1, 2)            # (B, H, S, hd)
            v = repeat_kv(v, self.n_rep).transpose(1, 2)
            out = sdpa(q, k, v, mask, p).transpose(1, 2)            # (B, T, H, hd)
        out = out.reshape(B, T, self.n_heads * self.hd)             # (B, T, H*hd)
        return self.resid_dropout(self.o_proj(out))
