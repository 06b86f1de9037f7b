"""The first MiniMind2-V release's weight files, renamed to the current upstream names.

Where it sits: under `checkpoint.py`, which calls `to_current(state, num_heads)` when a file
uses the first release's names. Before upstream MiniMind adopted Llama's (Hugging Face) names,
its files were laid out as

    tok_embeddings.weight                          -> model.embed_tokens.weight
    layers.N.attention.{wq,wk,wv,wo}.weight        -> model.layers.N.self_attn.{q,k,v,o}_proj.weight
    layers.N.attention_norm.weight                 -> model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight                       -> model.layers.N.post_attention_layernorm.weight
    layers.N.feed_forward.{w1,w3,w2}.weight        -> model.layers.N.mlp.{gate,up,down}_proj.weight
    norm.weight                                    -> model.norm.weight
    output.weight                                  -> lm_head.weight

and its RoPE rotated *interleaved* pairs: each head's dimensions (0, 1), (2, 3), ... were one
complex number (`view_as_complex`), pair i turning with frequency i. Ours (and the current
upstream's) rotates *half* pairs: dimension i with i + hd/2. The two are the same rotation of
reordered coordinates, so reordering the rows of wq and wk within each head,

    new row i        <- old row 2i          (i < hd/2: the real parts)
    new row i + hd/2 <- old row 2i + 1      (the imaginary parts)

makes rotate-half RoPE compute exactly what the interleaved one did. Scores q . k are unchanged
because q and k are reordered alike; v and wo are untouched.
"""
from __future__ import annotations

import re

import torch

RENAMES = [   # (first release, current upstream); {i} a layer index
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]


def is_first_release(state: dict) -> bool:
    """A state dict with the first release's names (`tok_embeddings`, `layers.N.attention.wq`)."""
    return "tok_embeddings.weight" in state or any(
        k.startswith("layers.") and k.endswith(".attention.wq.weight") for k in state)


def interleaved_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (H * hd, D) within each head: evens, then odds."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])     # (hd,)
    heads = w.shape[0] // head_dim
    return w.view(heads, head_dim, -1)[:, order].reshape(w.shape)


def to_current(state: dict, num_heads: int, source="state dict") -> dict:
    """First-release keys -> current upstream keys, q/k rows reordered for rotate-half RoPE.

    Keys no rule matches (the projector's `vision_proj.*`) pass through unchanged; `num_heads`
    gives the head size (the shapes cannot tell it): hd = width / num_heads.
    """
    if "tok_embeddings.weight" not in state:
        raise ValueError(f"{source}: first-release names without tok_embeddings.weight")
    head_dim = state["tok_embeddings.weight"].shape[1] // num_heads
    out = {}
    for key, value in state.items():
        for old, new in RENAMES:
            m = re.fullmatch(re.escape(old).replace(r"\{i\}", r"(?P<i>\d+)"), key)
            if m:
                if key.endswith((".wq.weight", ".wk.weight")):
                    value = interleaved_to_half(value, head_dim)
                out[new.format(**m.groupdict())] = value
                break
        else:
            out[key] = value
    return out
