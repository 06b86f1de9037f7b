"""Lesson 04 exercises: GQA head repetition, the causal mask, attention by hand, a KV cache.

Run `pytest lessons/04-attention` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

import torch

REFERENCE = {
    "repeat_kv": "minimind_v.attention:repeat_kv",
    "causal_mask": "minimind_v.attention:causal_mask",
    "attend": "minimind_v.attention:attend",
    "KVCache": "minimind_v.attention:KVCache",
}


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, H_kv, hd) -> (B, T, H_kv * n_rep, hd); head j of the result is kv head j // n_rep."""
    raise NotImplementedError


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool: True where query i (absolute position S - T + i) may attend to key j (j <= S - T + i)."""
    raise NotImplementedError


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, H, S, hd), mask bool broadcastable to (B, H, T, S), True = may attend.

    softmax(q k^T / sqrt(hd), masked entries set to the dtype's finfo.min) @ v -> (B, H, T, hd).
    Softmax in at least float32; return q's dtype. (Dropout on the probabilities when training.)
    """
    raise NotImplementedError


class KVCache:
    """Per-layer key/value storage for generation.

    update(layer, k, v): k, v (B, T, H_kv, hd) are the new tokens of `layer` (layers are first
    seen in order 0, 1, ...). Store them after the ones already cached and return all keys and
    values so far, (B, past + T, H_kv, hd). Keep one preallocated buffer per layer
    (`self.keys[layer]`, `self.values[layer]`, shape (B, capacity, H_kv, hd)) and write in place;
    when it is full, allocate one with twice the capacity and copy once.
    `length`: the number of cached positions (of layer 0).
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        raise NotImplementedError

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
