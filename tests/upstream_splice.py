"""Upstream MiniMind-V's `count_vision_proj`, transcribed: the outside reference for the splice.

The tests (test_splice.py, test_fused_splice.py) and benchmarks/bench_splice.py import it from
here, so there is one copy. Its `self.vision_proj` is already applied (vision_proj (B, N, L, D))
and seqlen is the row length T. Upstream matches the pattern at every offset and pastes each
match's image in order; where two matching windows overlap it pastes images over each other, so
our contract (greedy, non-overlapping runs, left to right) is compared with it only where no
windows overlap.
"""
from __future__ import annotations

import torch


def upstream_count_vision_proj(tokens, h, vision_proj, image_ids):
    """tokens (B, T), h (B, T, D), vision_proj (B, N, L, D), image_ids: L ids -> (B, T, D)."""
    L = len(image_ids)
    if L > tokens.size(1):
        return h
    pattern = torch.tensor(image_ids, device=tokens.device)
    matches = (tokens.unfold(1, L, 1) == pattern).all(dim=2)
    found = {b: [(i.item(), i.item() + L - 1) for i in matches[b].nonzero(as_tuple=True)[0]]
             for b in range(tokens.size(0)) if matches[b].any()}
    if not found:
        return h
    rows = []
    for b in range(h.size(0)):
        if b in found:
            row, n = h[b], 0
            for start, end in found[b]:
                if n < vision_proj.size(1):
                    row = torch.cat((row[:start], vision_proj[b][n], row[end + 1:]), dim=0)[:tokens.size(1)]
                    n += 1
            rows.append(row)
        else:
            rows.append(h[b])
    return torch.stack(rows, dim=0)
