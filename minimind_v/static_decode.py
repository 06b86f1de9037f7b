"""Compiled decoding: a static KV cache and one `torch.compile`d single-token step.

`generate(..., compile=True)` lands here. The eager decode step (generate.py) is a few big
matrix-vector products (every weight read once per token) and ~40 small ops per layer (norms,
RoPE, the cache write, the softmax, the residual adds), each a separate kernel launch from
Python. On a CPU those small ops cost about half as much as the products themselves. A compiler
can fuse them into a few C++ loops, but only if every step is the same graph with the same shapes:

- `StaticKVCache`: keys/values of every layer in buffers of a fixed length S, allocated once;
  step t writes position t in place (`index_copy_`, no `torch.cat`, no growth). The buffers are
  head-major (B, H_kv, S, hd): each head's keys are one contiguous (S, hd) matrix, the operand
  of the attention products as it is, for any batch size (at B = 1 the eager cache's token-major
  (B, S, H_kv, hd) measured the same).
- `decode_step`: one token (B, 1) at position `pos` (a (1,) tensor, not a Python int, so the
  step does not change between tokens) attends over all S slots; the slots not yet written
  (>= pos + 1) and padded prompt positions are masked out. The masked slots add exactly zero
  to the softmax, so the result is the eager step's up to float rounding.

The prompt (prefill) runs eagerly through the usual `KVCache` and is then copied into the
static buffers: its matmuls are big enough that a compiler gains little there, and a compiled
prefill would recompile for every prompt length. S is the prompt + new tokens rounded up to a
multiple of `SLOT_BLOCK`, so prompts of similar lengths reuse one compiled step.

    step = compiled_step()              # the first call for a model compiles (seconds)
    logits = step(lm, ids, pos, cache)  # ids (B, 1), pos (1,) -> logits (B, V)

One compiled step serves every model of the same structure (the weights are inputs, not constants);
a new structure, batch size or static length compiles again; past torch's limit (8 per function)
the step runs eagerly: the same result, without the speed-up.
"""
from __future__ import annotations

import torch

from .attention import KVCache, attend_grouped

SLOT_BLOCK = 256   # the static length S is a multiple of this (fewer distinct compiled steps)


class StaticKVCache:
    """Keys and values (B, H_kv, S, hd) per layer in fixed buffers, plus which slots may be read.

    `key_ok` (B, S) bool: slot j holds a real token (False on left pads of the prompt). After
    `fill`, the prompt occupies slots 0..T-1; decode step writes slot `pos`.
    """

    def __init__(self, num_layers: int, batch: int, slots: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch, n_kv, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_ok = torch.ones(batch, slots, dtype=torch.bool, device=device)
        self.slots = torch.arange(slots, device=device)          # (S,) slot numbers, for the causal mask

    def fill(self, cache: KVCache, attention_mask: torch.Tensor | None = None) -> None:
        """Copy an eager cache of T prompt positions into slots 0..T-1; attention_mask (B, T) 0 = pad."""
        T = cache.length
        for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
            self.keys[layer][:, :, :T] = k[:, :T].transpose(1, 2)       # (B, H_kv, T, hd)
            self.values[layer][:, :, :T] = v[:, :T].transpose(1, 2)
        if attention_mask is not None:
            self.key_ok[:, :T] = attention_mask.bool()


def decode_step(lm, ids: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """One token per row at position `pos` through the LM `lm` (a `MiniMindLM`, eval mode).

    ids (B, 1), pos (1,) int64 -> logits (B, V). Writes this token's keys/values to slot `pos`.
    The same computation as `lm(ids, kv_cache=...)` on an eager cache of `pos` tokens.
    """
    B = ids.shape[0]
    h = lm.embed(ids)                                                   # (B, 1, D)
    cos = lm.rope_cos.index_select(0, pos).to(h.dtype)                  # (1, hd)
    sin = lm.rope_sin.index_select(0, pos).to(h.dtype)
    # may attend: written slots up to and including pos, and not a pad -> (B, 1, 1, S)
    mask = (cache.key_ok & (cache.slots <= pos))[:, None, None, :]
    for layer, block in enumerate(lm.layers):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(h), cos, sin)            # (B, 1, H, hd), (B, 1, H_kv, hd)
        keys = cache.keys[layer].index_copy_(2, pos, k.transpose(1, 2))     # (B, H_kv, S, hd), in place
        values = cache.values[layer].index_copy_(2, pos, v.transpose(1, 2))
        # attend_grouped takes token-major views (B, S, H_kv, hd) and turns them back: no copy
        out = attend_grouped(q, keys.transpose(1, 2), values.transpose(1, 2), mask)   # (B, 1, H, hd)
        h = h + attn.o_proj(out.reshape(B, 1, -1))
        h = h + block.ffn(block.ffn_norm(h))
    return lm.lm_head(lm.norm(h[:, -1]))                                # (B, V)


_COMPILED: dict[bool, object] = {}


def compiled_step(fullgraph: bool = True):
    """`decode_step` through `torch.compile`, built once; each new model, batch size or static length
    compiles on its first call (seconds), later calls reuse it.

    fullgraph: the dense model compiles to one graph (an error otherwise). The MoE FFN loops over
    the experts that were picked (a data-dependent count), so for it pass False: the compiler then
    splits the graph around that loop.
    """
    if fullgraph not in _COMPILED:
        # cpp_wrapper: the ~150 kernel calls of a step are made from generated C++, not Python
        _COMPILED[fullgraph] = torch.compile(decode_step, fullgraph=fullgraph, dynamic=False,
                                             options={"cpp_wrapper": True})
    return _COMPILED[fullgraph]


def static_slots(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The static cache length S: prompt + new tokens rounded up to SLOT_BLOCK, within the context."""
    need = prompt_len + max_new_tokens
    return min(-(-need // SLOT_BLOCK) * SLOT_BLOCK, max_seq_len)
