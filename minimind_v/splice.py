"""Splice image vectors into the token embeddings, in place of the image placeholder runs.

Where this sits in the data flow: the tokenizer writes each image in the prompt as a run of L
identical placeholder ids (upstream MiniMind2-V: L = 196 copies of id 34, the '@' token). The
language model embeds every id, placeholders included, into `h (B, T, D)`. The vision encoder and
the projector turn each image into L vectors of size D, `image_embeds (B, N, L, D)` for up to N
images per row. This module replaces, in every row, the n-th placeholder run by the row's n-th
image; the result goes into the transformer blocks as if it were ordinary token embeddings.

Two implementations with the same arguments and the same result:

- `splice_loop`: the reference. Upstream MiniMind-V's algorithm (its `count_vision_proj`) written out plainly: find every window that
  matches the placeholder ids, then walk the rows one by one in Python and rebuild each row with
  `torch.cat` around each run. Easy to check by eye, slow: per-row Python work, a host
  synchronisation per row (`.tolist()` on a GPU tensor waits for the device), a new row per run.
- `splice`: the vectorized rewrite. Every step is a whole-batch tensor op of a fixed shape: find the
  runs, put their starts in order, compute where each image vector lands, then one `index_copy_`
  writes all image vectors into one copy of `h`. No Python loop over rows, runs or images, no host
  synchronisation, `torch.compile(fullgraph=True)` traces it, and gradients flow to `h` (the
  untouched positions) and to `image_embeds` (the placed vectors).

The rules both follow (the contract):
- A run is L consecutive ids equal to `image_ids`. Runs are taken greedily left to right and never
  overlap: after a run at position s the search resumes at s + L, exactly like `str.replace`. So a
  block of 2L placeholder ids is two images back to back, and a block of L + 3 is one image followed
  by 3 placeholder ids that stay text. (Upstream matched a window at *every* offset; for overlapping
  windows it pasted image n+1 one position after image n, over it. Where no windows overlap,
  upstream and these functions agree.)
- The n-th run of a row receives the row's image n. Runs beyond the N images stay text.
- A partial run cut by the end of the row is not a match: it stays text.
- Every replacement swaps L positions for L vectors, so each row keeps its length T (upstream's
  "truncate to the row length" never cuts anything).
"""
from __future__ import annotations

import torch


def check_splice_args(input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor, image_ids) -> int:
    """Shape checks shared by both functions; returns L."""
    L = len(image_ids)
    if L == 0:
        raise ValueError("image_ids is empty; an image needs at least one placeholder id")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if h.dim() != 3 or h.shape[:2] != input_ids.shape:
        raise ValueError(f"h must be (B, T, D) with (B, T) = {tuple(input_ids.shape)}, got {tuple(h.shape)}")
    B, T, D = h.shape
    if image_embeds.dim() != 4 or image_embeds.shape[0] != B or image_embeds.shape[2] != L \
            or image_embeds.shape[3] != D:
        raise ValueError(f"image_embeds must be (B, N, L, D) = ({B}, N, {L}, {D}) "
                         f"(L = len(image_ids)), got {tuple(image_embeds.shape)}")
    return L


def find_matches(input_ids: torch.Tensor, image_ids) -> torch.Tensor:
    """(B, T) ids -> (B, T - L + 1) bool: True where the window starting there equals `image_ids`.

    Windows overlap, so a block of L + 1 placeholders matches at two offsets.
    General pattern: upstream's sliding window, `unfold` views every length-L window without
    copying and compares it with the pattern, O(T * L) work. One repeated id (the usual case, 196
    copies of the image-pad id): a window matches when it holds L placeholders, which a running
    count gives in O(T): count[s + L] - count[s] == L.
    """
    L = len(image_ids)
    B, T = input_ids.shape
    if T < L:                                           # no window fits
        return torch.zeros(B, 0, dtype=torch.bool, device=input_ids.device)
    if all(i == image_ids[0] for i in image_ids):
        count = (input_ids == image_ids[0]).cumsum(1, dtype=torch.int32)    # (B, T)
        count = torch.nn.functional.pad(count, (1, 0))                      # (B, T + 1), count[0] = 0
        return (count[:, L:] - count[:, :-L]) == L                          # (B, T - L + 1)
    pattern = torch.tensor(image_ids, dtype=input_ids.dtype, device=input_ids.device)  # (L,)
    windows = input_ids.unfold(1, L, 1)                 # (B, T - L + 1, L), a view
    return (windows == pattern).all(dim=-1)             # (B, T - L + 1)


# ---------------------------------------------------------------------------------------------
# the reference: one row, one run at a time
# ---------------------------------------------------------------------------------------------

def splice_loop(input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor,
                image_ids) -> torch.Tensor:
    """Replace the n-th placeholder run of each row by that row's image n (reference version).

    input_ids (B, T), h (B, T, D), image_embeds (B, N, L, D), image_ids: list of L ids.
    Returns a (B, T, D) tensor; `h` is not modified.
    """
    L = check_splice_args(input_ids, h, image_embeds, image_ids)
    B, T, D = h.shape
    N = image_embeds.shape[1]
    image_embeds = image_embeds.to(h.dtype)
    if T < L:                                           # no window fits in the row
        return h.clone()
    # upstream's sliding window: compare every length-L window with the pattern
    pattern = torch.tensor(image_ids, dtype=input_ids.dtype, device=input_ids.device)  # (L,)
    matches = (input_ids.unfold(1, L, 1) == pattern).all(dim=-1)                      # (B, T - L + 1)
    rows = []
    for b in range(B):
        row = h[b]                                      # (T, D)
        starts = matches[b].nonzero().flatten().tolist()    # host sync: waits for the device
        n = 0                                           # next image of this row
        free_from = 0                                   # first position not inside a placed run
        for s in starts:
            if n == N:                                  # out of images: later runs stay text
                break
            if s < free_from:                           # overlaps the run just placed: skip
                continue
            # the row before the run, the image's L vectors, the row after; length stays T
            row = torch.cat([row[:s], image_embeds[b, n], row[s + L:]], dim=0)[:T]
            n += 1
            free_from = s + L
        rows.append(row)
    return torch.stack(rows, dim=0)                     # (B, T, D)


# ---------------------------------------------------------------------------------------------
# the vectorized rewrite: whole-batch tensor ops of fixed shapes
# ---------------------------------------------------------------------------------------------

def select_runs(matches: torch.Tensor, L: int) -> torch.Tensor:
    """(B, W) window matches -> (B, W) bool: the runs kept by a greedy left-to-right scan.

    The scan keeps the first match, then the first match at or after (kept + L), and so on. That is
    a chain: `nxt[p]` = first match at or after p + L, and the kept set is {f, nxt[f], nxt[nxt[f]],
    ...} for the first match f. A chain is followed without a Python loop over its links by
    pointer jumping: after step k, `jump` moves 2^k links at once and `kept` holds every node within
    2^(k+1) - 1 links of f. A chain in W windows has at most (W - 1) // L + 1 links, so
    ceil(log2) of that many steps suffice (2 steps for T = 640, L = 196); the count depends on
    shapes only, never on the data, so there is no host synchronisation.
    """
    B, W = matches.shape
    pos = torch.arange(W, device=matches.device)                            # (W,)
    # first match at or after each position (W = "none"): a reversed running minimum
    at = torch.where(matches, pos, W)                                       # (B, W)
    first_from = at.flip(-1).cummin(-1).values.flip(-1)                     # (B, W)
    first_from = torch.cat([first_from, first_from.new_full((B, L + 1), W)], dim=1)  # (B, W + L + 1)
    # links: p -> first match at or after p + L; the extra column W is "none" and points to itself
    jump = first_from[:, L:L + W + 1]                                       # (B, W + 1)
    kept = torch.zeros(B, W + 1, dtype=torch.bool, device=matches.device)
    kept.scatter_(1, first_from[:, :1], True)                               # the first match
    links = (W - 1) // L + 1
    for _ in range(max(links - 1, 0).bit_length()):                         # ceil(log2(links)) steps
        reached = torch.zeros_like(kept).scatter_reduce_(1, jump, kept, reduce="amax")
        kept = kept | reached
        jump = jump.gather(1, jump)                                         # twice as far
    return kept[:, :W]                                                      # (B, W)


def runs_of_one_id(input_ids: torch.Tensor, pad_id: int, L: int) -> torch.Tensor:
    """`select_runs(find_matches(input_ids, [pad_id] * L), L)` in closed form: (B, T) -> (B, W) bool.

    With one repeated id the greedy scan cuts every block of consecutive placeholders into runs of
    L from the block's first position: a run starts where the position inside its block is a
    multiple of L and the block still holds L placeholders from there.
    """
    B, T = input_ids.shape
    W = T - L + 1
    is_pad = input_ids == pad_id                                            # (B, T)
    pos = torch.arange(T, device=input_ids.device)                          # (T,)
    block_start = torch.where(is_pad, 0, pos + 1).cummax(1).values         # (B, T): first pad of the block
    offset = pos - block_start                                              # (B, T): position inside the block
    whole = offset[:, L - 1:] - offset[:, :W] == L - 1                      # (B, W): L pads from s on
    return is_pad[:, :W] & whole & (offset[:, :W] % L == 0)                 # (B, W)


def image_starts(input_ids: torch.Tensor, image_ids, N: int) -> torch.Tensor:
    """(B, T) ids -> (B, N) long: where image n of each row starts, or T where it has no run.

    The starts of a row are increasing and at least L apart (runs never overlap).
    """
    L = len(image_ids)
    B, T = input_ids.shape
    W = T - L + 1                                       # number of windows per row
    device = input_ids.device
    if W <= 0:                                          # no run fits: every image is unplaced
        return torch.full((B, N), T, dtype=torch.long, device=device)
    # 1. which windows start a run (a closed form for the usual one-id placeholder)
    if all(i == image_ids[0] for i in image_ids):
        starts = runs_of_one_id(input_ids, image_ids[0], L)         # (B, W) bool
    else:
        starts = select_runs(find_matches(input_ids, image_ids), L)
    # 2. the n-th run's start is the n-th smallest kept position. Sorting the kept positions
    #    (others set to T = "no run"), with N extra "no run" entries appended so that a row with
    #    fewer runs than images still has N values, gives them in order.
    pos = torch.arange(W, device=device)                            # (W,)
    no_run = torch.full((B, N), T, dtype=torch.long, device=device)
    candidates = torch.cat([torch.where(starts, pos, T), no_run], dim=1)    # (B, W + N)
    return candidates.sort(dim=1).values[:, :N]                     # (B, N): start of image n, or T


def splice(input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor,
           image_ids) -> torch.Tensor:
    """Replace the n-th placeholder run of each row by that row's image n (vectorized version).

    Same arguments, rules and result as `splice_loop`:
    input_ids (B, T), h (B, T, D), image_embeds (B, N, L, D), image_ids: list of L ids.
    """
    L = check_splice_args(input_ids, h, image_embeds, image_ids)
    B, T, D = h.shape
    N = image_embeds.shape[1]
    image_embeds = image_embeds.to(h.dtype)
    if T < L or N == 0:                                 # shapes alone say nothing is replaced
        return h.clone()
    device = h.device
    image_start = image_starts(input_ids, image_ids, N)             # (B, N)
    # 3. destination row (in h flattened to (B*T, D)) of every image vector; the vectors of an image
    #    without a run all go to one scratch row after the B*T real ones, dropped at the end
    j = torch.arange(L, device=device)                                           # (L,)
    b = torch.arange(B, device=device)[:, None, None]                            # (B, 1, 1)
    placed = (image_start < T)[:, :, None]                                       # (B, N, 1)
    dest = torch.where(placed, b * T + image_start[:, :, None] + j, B * T)       # (B, N, L)
    # 4. one copy of h, then all image vectors written in one indexed copy
    out = h.new_empty(B * T + 1, D)
    out[:B * T] = h.reshape(B * T, D)
    out.index_copy_(0, dest.flatten(), image_embeds.reshape(B * N * L, D))
    return out[:B * T].view(B, T, D)
