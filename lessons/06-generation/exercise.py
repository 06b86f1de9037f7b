"""Lesson 06 exercises: sampling filters and cached generation.

Run `pytest lessons/06-generation` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

import torch

from minimind_v.attention import KVCache   # noqa: F401  (lesson 04)

REFERENCE = {
    "apply_repetition_penalty": "minimind_v.generate:apply_repetition_penalty",
    "top_k_filter": "minimind_v.generate:top_k_filter",
    "top_p_filter": "minimind_v.generate:top_p_filter",
    "next_token": "minimind_v.generate:next_token",
    "generate": "minimind_v.generate:generate",
}


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), seen (B, S) ids already in each row (may repeat) -> new logits (B, V).
    For each seen token: logit / penalty if the logit > 0, else logit * penalty."""
    raise NotImplementedError


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (B, V): keep the k largest per row (ties with the k-th are kept), others -> -inf."""
    raise NotImplementedError


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits (B, V): keep the most likely tokens until their total probability first reaches p
    (the most likely token is always kept); others -> -inf. Kept logits are unchanged."""
    raise NotImplementedError


def next_token(logits: torch.Tensor, seen: torch.Tensor, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> ids (B,). Penalty (on float32 logits), then temperature 0 -> argmax; else
    divide by temperature, top-k, top-p, softmax, torch.multinomial(..., generator=generator)."""
    raise NotImplementedError


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_id: int | None = None, seed: int | None = None) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + n), the prompt followed by n <= max_new_tokens new ids.

    Prefill the prompt into a KVCache, then feed one token per step (`model(ids, kv_cache=cache)`).
    The repetition penalty sees the prompt and everything generated so far. Sample with a
    torch.Generator seeded with `seed`. With eos_id: a finished row keeps emitting eos_id; stop
    when every row has finished. Raise ValueError if T + max_new_tokens > model.max_seq_len.
    """
    raise NotImplementedError
