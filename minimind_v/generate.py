"""Autoregressive generation: prefill once, then one token at a time from the KV cache.

    prefill: logits = model(prompt, kv_cache)        # the whole prompt, fills the cache
    decode:  logits = model(last_token, kv_cache)    # (B, 1): attends to every cached position

Without a cache each new token would recompute attention over the whole sequence (quadratic
work per step); with it a step costs one token's worth of matmuls plus a read of the cache.

Choosing the next token from the last logits (B, V):
- repetition penalty p: a logit of a token already in the sequence is divided by p if
  positive, multiplied by p if negative (CTRL's rule, as in Hugging Face);
- temperature 0 = greedy argmax; otherwise logits / temperature, then
- top-k keeps the k most likely tokens, top-p the smallest set whose probability >= p;
- sample from the renormalised distribution (seeded through a torch.Generator).

Images: a VLM gets `pixel_values=images` at prefill only; decode steps are plain text.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .attention import KVCache
from .static_decode import StaticKVCache, compiled_step, static_slots


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, S) ids already in each row."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)                                          # (B, S)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row, set the rest to -inf. logits (B, V)."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[:, -1:]                              # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the nucleus: the most likely tokens whose total probability first reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)              # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                               # probability of strictly better tokens
    drop_sorted = mass_before >= p                                           # the first token is always kept
    drop = drop_sorted.scatter(1, order, drop_sorted)                        # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, seen: torch.Tensor, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) of the last position -> next ids (B,)."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
           eos_id: int | None = None, images: torch.Tensor | None = None,
           attention_mask: torch.Tensor | None = None, seed: int | None = None,
           compile: bool = False, image_features: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,) step by step; stops after max_new_tokens or when every row hit eos_id.

    input_ids (B, T). Prompts of different lengths: left-pad them and pass attention_mask (B, T)
    with 0 on the pads. Rows that already produced eos_id keep yielding eos_id.
    compile=True: decode steps run `static_decode.decode_step` through torch.compile on a static
    cache (the same tokens; the first call for a model or length compiles, which takes seconds).
    images (B, N, 3, S, S) pixels, or image_features (B, N, P, Dv): the encoder's output for them,
    computed beforehand (e.g. once per picture when many questions share it).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    limit = getattr(model, "max_seq_len", None)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds "
                         f"the model's context of {limit} tokens")
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = KVCache()
    extra = {} if images is None else {"pixel_values": images}
    if image_features is not None:
        extra["image_features"] = image_features                  # the model refuses both at once
    if attention_mask is not None:
        extra["attention_mask"] = attention_mask
    # prefill: the whole prompt fills the cache; only the last position's logits are needed
    last = torch.zeros_like(input_ids, dtype=torch.bool)
    last[:, -1] = True
    logits = model(input_ids, kv_cache=cache, logits_at=last, **extra)       # prefill: (B, V)
    if compile:
        lm = getattr(model, "lm", model)                                   # a VLM decodes with its LM
        cfg = lm.cfg
        static = StaticKVCache(cfg.num_layers, input_ids.shape[0],
                               static_slots(input_ids.shape[1], max_new_tokens, cfg.max_seq_len),
                               cfg.num_kv_heads, cfg.head_dim, cache.keys[0].dtype, input_ids.device)
        static.fill(cache, attention_mask)
        step_fn, pos = compiled_step(fullgraph=not cfg.use_moe), input_ids.shape[1]
    seen = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    try:
        for _ in range(max_new_tokens):
            ids = next_token(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
            if eos_id is not None:
                ids = torch.where(done, torch.full_like(ids, eos_id), ids)
                done = done | (ids == eos_id)
            yield ids
            if eos_id is not None and bool(done.all()):
                return
            seen = torch.cat([seen, ids[:, None]], dim=1)
            if compile:
                position = torch.tensor([pos], device=ids.device)
                logits, pos = step_fn(lm, ids[:, None], position, static), pos + 1   # (B, V)
                continue
            step = {}
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(ids), 1)], dim=1)
                step["attention_mask"] = attention_mask
            logits = model(ids[:, None], kv_cache=cache, **step)[:, -1, :]  # decode: (B, V)
    finally:
        model.train(was_training)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_id: int | None = None, images: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, seed: int | None = None,
             compile: bool = False, image_features: torch.Tensor | None = None) -> torch.Tensor:
    """The prompt followed by the generated ids: (B, T + n), n <= max_new_tokens (`stream`'s options)."""
    new = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                      repetition_penalty, eos_id, images, attention_mask, seed, compile, image_features))
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


@torch.no_grad()
def generate_without_cache(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence every step (the baseline the cache beats)."""
    model.eval()
    ids = input_ids
    for _ in range(max_new_tokens):
        nxt = model(ids)[:, -1, :].argmax(dim=-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids
