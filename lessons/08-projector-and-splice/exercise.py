"""Lesson 08 exercises: the projector and the splice.

Run `pytest lessons/08-projector-and-splice` to grade your code (`--reference` grades minimind_v).
Notation: B rows, T tokens per row, D model width, N images per row, L placeholder ids per image.
"""
from __future__ import annotations

import torch
from torch import nn

REFERENCE = {
    "VisionProjector": "minimind_v.vlm:VisionProjector",
    "find_matches": "minimind_v.splice:find_matches",
    "splice_loop": "minimind_v.splice:splice_loop",
    "select_runs": "minimind_v.splice:select_runs",
    "splice": "minimind_v.splice:splice",
}


class VisionProjector(nn.Module):
    """(.., in_dim) -> (.., out_dim).

    kind="linear": `self.vision_proj = nn.Sequential(nn.Linear(in_dim, out_dim))` (bias on), so the
    weight is named `vision_proj.0.weight` as in upstream MiniMind2-V.
    kind="mlp": `self.vision_proj = nn.Sequential(LayerNorm(in_dim), Linear(in_dim, out_dim), GELU(),
    Linear(out_dim, out_dim))`. Any other kind: ValueError.
    """

    def __init__(self, in_dim: int = 768, out_dim: int = 512, kind: str = "linear"):
        super().__init__()
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def find_matches(input_ids: torch.Tensor, image_ids: list[int]) -> torch.Tensor:
    """input_ids (B, T) -> (B, T - L + 1) bool: True where input_ids[b, s:s+L] == image_ids.

    (B, 0) when T < L. Hint: `input_ids.unfold(1, L, 1)` is a (B, T - L + 1, L) view of every window.
    """
    raise NotImplementedError


def splice_loop(input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor,
                image_ids: list[int]) -> torch.Tensor:
    """The reference: h (B, T, D) with the n-th run of `image_ids` in row b replaced by
    image_embeds[b, n] (image_embeds (B, N, L, D)). Runs are taken left to right and never overlap
    (after a run at s, the next may start at s + L); runs beyond the N images stay text; a run cut
    by the end of the row is not a run. Returns a new (B, T, D) tensor; `h` is left unchanged.
    Loops over rows and runs are fine here.
    """
    raise NotImplementedError


def select_runs(matches: torch.Tensor, L: int) -> torch.Tensor:
    """matches (B, W) bool -> (B, W) bool: the matches a greedy left-to-right scan keeps
    (keep the first match, then the first match at or after kept + L, and so on).

    No Python loop over rows or matches: a loop whose length depends only on W and L is fine
    (see the README: "pointer jumping").
    """
    raise NotImplementedError


def splice(input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor,
           image_ids: list[int]) -> torch.Tensor:
    """Same arguments and result as `splice_loop`, vectorized: no Python loop over rows, runs or
    images, and no host synchronisation (.item(), .tolist(), nonzero(), bool(tensor)...): it must
    run on the "meta" device, where tensors have shapes but no values. Gradients must reach both
    h and image_embeds.
    """
    raise NotImplementedError
