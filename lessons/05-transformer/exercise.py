"""Lesson 05 exercises: SwiGLU, the pre-norm block, MiniMindLM, the shifted loss.

Run `pytest lessons/05-transformer` to grade your code (`--reference` grades minimind_v instead).
Parts from earlier lessons are imported from minimind_v.
"""
from __future__ import annotations

import torch
from torch import nn

from minimind_v.attention import Attention, KVCache, build_mask   # noqa: F401  (lesson 04)
from minimind_v.config import LMConfig                            # noqa: F401
from minimind_v.norm import RMSNorm                                # noqa: F401  (lesson 02)
from minimind_v.rope import rope_tables                            # noqa: F401  (lesson 03)

REFERENCE = {
    "SwiGLU": "minimind_v.ffn:SwiGLU",
    "Block": "minimind_v.lm:Block",
    "MiniMindLM": "minimind_v.lm:MiniMindLM",
    "lm_loss": "minimind_v.lm:lm_loss",
}


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); bias-free nn.Linear layers gate_proj, up_proj (D -> F), down_proj (F -> D).
    x (B, T, D) -> (B, T, D)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Block(nn.Module):
    """Pre-norm block: attn_norm (RMSNorm), attn (Attention(cfg, layer_idx)), ffn_norm, ffn (SwiGLU).

    forward(h, cos, sin, mask, kv_cache): h = h + attn(attn_norm(h), cos, sin, mask, kv_cache);
    then h + ffn(ffn_norm(h)). h (B, T, D) -> (B, T, D).
    """

    def __init__(self, cfg: LMConfig, layer_idx: int):
        super().__init__()
        raise NotImplementedError

    def forward(self, h, cos, sin, mask, kv_cache=None):
        raise NotImplementedError


class MiniMindLM(nn.Module):
    """embed_tokens (nn.Embedding V x D) -> layers (nn.ModuleList of Block) -> norm (RMSNorm) -> lm_head
    (bias-free Linear D -> V; the same Parameter as embed_tokens.weight when cfg.tie_word_embeddings).

    RoPE tables of cfg.max_seq_len rows (cfg.head_dim, cfg.rope_theta) as non-persistent buffers.
    forward(input_ids (B, T), kv_cache=None, attention_mask=None) -> logits (B, T, V):
    past = kv_cache.length (0 without a cache); cos/sin rows past..past+T-1;
    mask = build_mask(T, past + T, attention_mask).
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits (B, T, V), labels (B, T): mean cross-entropy of logits[:, t] against labels[:, t+1],
    skipping labels equal to ignore_index. Compute in float32."""
    raise NotImplementedError
