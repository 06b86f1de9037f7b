"""splice (vectorized) == splice_loop (reference) == upstream MiniMind-V's algorithm where it is defined.

Upstream's `count_vision_proj` (transcribed in tests/upstream_splice.py) is the outside reference:
on inputs where no two matching windows overlap, all three agree. Where windows overlap, upstream pastes images over
each other and our contract (greedy left-to-right, non-overlapping runs) takes over; there the
two functions must agree with each other and with hand-built expected outputs.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind_v.splice import find_matches, select_runs, splice, splice_loop
from upstream_splice import upstream_count_vision_proj




def windows_overlap(input_ids, image_ids) -> bool:
    m = find_matches(input_ids, image_ids)
    L = len(image_ids)
    for row in m:
        pos = row.nonzero().flatten().tolist()
        if any(b - a < L for a, b in zip(pos, pos[1:])):
            return True
    return False


def both(input_ids, h, img, image_ids):
    a = splice_loop(input_ids, h, img, image_ids)
    b = splice(input_ids, h, img, image_ids)
    assert a.shape == h.shape and b.shape == h.shape
    assert torch.equal(a, b), (input_ids, image_ids)
    return b


def rand(B, T, N, L, D=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=dtype) + 5.0      # text: around +5
    img = torch.randn(B, N, L, D, generator=g, dtype=dtype) - 5.0  # images: around -5
    return h, img


# ---------------------------------------------------------------------------------------------
# hand-built cases
# ---------------------------------------------------------------------------------------------
P = 9  # placeholder id


def expected(h, img, placements):
    """placements: list of (row, start, image index)."""
    out = h.clone()
    L = img.shape[2]
    for b, s, n in placements:
        out[b, s:s + L] = img[b, n]
    return out


def test_several_images_per_row_and_rows_without_images():
    ids = torch.tensor([[1, P, P, P, 2, 3, P, P, P, 4],
                        [1, 2, 3, 4, 5, 6, 7, 8, 1, 2],
                        [P, P, P, 1, 1, 1, 1, P, P, P]])
    h, img = rand(3, 10, 2, 3)
    out = both(ids, h, img, [P] * 3)
    assert torch.equal(out, expected(h, img, [(0, 1, 0), (0, 6, 1), (2, 0, 0), (2, 7, 1)]))
    assert torch.equal(out, upstream_count_vision_proj(ids, h, img, [P] * 3))


def test_fewer_images_than_runs_extra_runs_stay_text():
    ids = torch.tensor([[P, P, 1, P, P, 2, P, P, 3]])
    h, img = rand(1, 9, 2, 2)
    out = both(ids, h, img, [P, P])
    assert torch.equal(out, expected(h, img, [(0, 0, 0), (0, 3, 1)]))
    assert torch.equal(out[0, 6:8], h[0, 6:8])
    assert torch.equal(out, upstream_count_vision_proj(ids, h, img, [P, P]))


def test_more_images_than_runs_extra_images_unused():
    ids = torch.tensor([[1, P, P, 2, 2], [1, 1, 1, 1, 1]])
    h, img = rand(2, 5, 3, 2)
    out = both(ids, h, img, [P, P])
    assert torch.equal(out, expected(h, img, [(0, 1, 0)]))


def test_run_cut_by_the_end_of_the_row_stays_text():
    ids = torch.tensor([[1, P, P, P, 2, 3, 4, P, P], [P, P, P, 1, 1, 1, 1, 1, P]])
    h, img = rand(2, 9, 2, 3)
    out = both(ids, h, img, [P] * 3)
    assert torch.equal(out, expected(h, img, [(0, 1, 0), (1, 0, 0)]))
    assert torch.equal(out[0, 7:], h[0, 7:])


def test_overlong_block_is_one_image_then_text():
    # L + 3 placeholders: one run, the 3 left over stay text (upstream matched at 4 offsets)
    ids = torch.tensor([[1] + [P] * 7 + [2, 2]])
    h, img = rand(1, 10, 3, 4)
    out = both(ids, h, img, [P] * 4)
    assert torch.equal(out, expected(h, img, [(0, 1, 0)]))
    assert torch.equal(out[0, 5:8], h[0, 5:8])
    # where upstream differs: it pastes image 1 one step after image 0, over it
    upstream = upstream_count_vision_proj(ids, h, img, [P] * 4)
    assert not torch.equal(upstream, out)


def test_adjacent_images_are_two_runs():
    # 2L placeholders back to back = two images
    ids = torch.tensor([[1] + [P] * 6 + [2]])
    h, img = rand(1, 8, 2, 3)
    out = both(ids, h, img, [P] * 3)
    assert torch.equal(out, expected(h, img, [(0, 1, 0), (0, 4, 1)]))


def test_general_self_overlapping_pattern():
    # pattern 5 6 5: "5 6 5 6 5" has windows at 0 and 2 that overlap; greedy keeps 0 only
    pat = [5, 6, 5]
    ids = torch.tensor([[5, 6, 5, 6, 5, 1, 5, 6, 5, 5, 6, 5]])
    h, img = rand(1, 12, 3, 3)
    out = both(ids, h, img, pat)
    assert torch.equal(out, expected(h, img, [(0, 0, 0), (0, 6, 1), (0, 9, 2)]))


def test_row_shorter_than_a_run_and_no_images():
    h, img = rand(2, 2, 1, 3)
    ids = torch.full((2, 2), P)
    assert torch.equal(both(ids, h, img, [P] * 3), h)
    h, img = rand(2, 6, 0, 3)
    ids = torch.full((2, 6), P)
    assert torch.equal(both(ids, h, img, [P] * 3), h)


def test_h_is_not_modified():
    ids = torch.tensor([[P, P, 1]])
    h, img = rand(1, 3, 1, 2)
    before = h.clone()
    splice(ids, h, img, [P, P])
    splice_loop(ids, h, img, [P, P])
    assert torch.equal(h, before)


def test_image_embeds_take_the_dtype_of_h():
    ids = torch.tensor([[P, P, 1]])
    h, img = rand(1, 3, 1, 2, dtype=torch.float64)
    out = both(ids, h, img.float(), [P, P])
    assert out.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# property-based: many random batches
# ---------------------------------------------------------------------------------------------

@st.composite
def batches(draw):
    L = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["repeated", "general"]))
    if kind == "repeated":
        image_ids = [P] * L
    else:
        image_ids = draw(st.lists(st.integers(5, 7), min_size=L, max_size=L))
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 14))
    N = draw(st.integers(0, 3))
    # ids from a small alphabet that contains the pattern's ids, so runs and near-runs are common
    alphabet = sorted(set(image_ids) | {1, 2})
    rows = [draw(st.lists(st.sampled_from(alphabet), min_size=T, max_size=T)) for _ in range(B)]
    seed = draw(st.integers(0, 2**16))
    return torch.tensor(rows), image_ids, N, seed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_splice_equals_splice_loop_on_random_batches(case):
    ids, image_ids, N, seed = case
    B, T = ids.shape
    h, img = rand(B, T, N, len(image_ids), seed=seed)
    out = both(ids, h, img, image_ids)
    # every position holds either its own text vector or an image vector (images are < 0, text > 0)
    is_img = (out < 0).all(-1)
    assert torch.equal(out[~is_img], h[~is_img])
    # and where no windows overlap, upstream agrees too
    if not windows_overlap(ids, image_ids):
        assert torch.equal(out, upstream_count_vision_proj(ids, h, img, image_ids))


def test_select_runs_is_greedy_left_to_right():
    # windows 0..9 matching everywhere, L = 3 -> runs at 0, 3, 6, 9
    m = torch.ones(2, 10, dtype=torch.bool)
    m[1, 0] = False          # second row: first match at 1 -> 1, 4, 7
    kept = select_runs(m, 3)
    assert kept[0].nonzero().flatten().tolist() == [0, 3, 6, 9]
    assert kept[1].nonzero().flatten().tolist() == [1, 4, 7]


# ---------------------------------------------------------------------------------------------
# gradients, no host synchronisation, torch.compile
# ---------------------------------------------------------------------------------------------

def test_gradcheck_through_splice():
    ids = torch.tensor([[1, P, P, 2, P, P, P], [P, P, 1, 1, 1, 1, 1]])
    h, img = rand(2, 7, 3, 2, D=2, seed=3, dtype=torch.float64)
    h.requires_grad_(True)
    img.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, img: splice(ids, h, img, [P, P]), (h, img))


def test_gradients_match_the_loop():
    ids = torch.tensor([[1, P, P, 2, P, P, P], [P, P, 1, 1, 1, 1, 1]])
    grads = []
    for fn in (splice, splice_loop):
        h, img = rand(2, 7, 3, 2, D=4, seed=4)
        h.requires_grad_(True)
        img.requires_grad_(True)
        w = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(5))
        (fn(ids, h, img, [P, P]) * w).sum().backward()
        grads.append((h.grad, img.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    h_grad, img_grad = grads[0]
    assert (h_grad[0, 1:3] == 0).all() and (h_grad[0, 0] != 0).all()   # replaced text gets no gradient
    assert (img_grad[1, 1:] == 0).all() and (img_grad[0, :2] != 0).all()  # unused images get none


def test_no_host_synchronisation():
    # on the meta device there are no values: any .item(), .tolist() or nonzero() would fail
    meta = dict(device="meta")
    ids = torch.empty(4, 640, dtype=torch.long, **meta)
    h = torch.empty(4, 640, 32, **meta)
    img = torch.empty(4, 2, 196, 32, **meta)
    assert splice(ids, h, img, [34] * 196).shape == (4, 640, 32)
    assert splice(ids, h, img, [34, 35] * 98).shape == (4, 640, 32)
    with pytest.raises(Exception):
        splice_loop(ids, h, img, [34] * 196)


def test_compiles_without_graph_break():
    compiled = torch.compile(splice, fullgraph=True, backend="aot_eager")
    ids = torch.tensor([[1, P, P, 2, P, P, P, P], [P, P, 1, 1, 1, 1, 1, P]])
    h, img = rand(2, 8, 2, 2, D=4, seed=6)
    h.requires_grad_(True)
    out = compiled(ids, h, img, [P, P])
    assert torch.equal(out, splice_loop(ids, h, img, [P, P]))
    out.sum().backward()
    assert h.grad is not None


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [splice, splice_loop])
def test_bad_shapes_are_named(fn):
    ids = torch.zeros(2, 5, dtype=torch.long)
    h = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="image_embeds must be"):
        fn(ids, h, torch.zeros(2, 1, 3, 4), [P, P])          # L = 3 but 2 ids
    with pytest.raises(ValueError, match="h must be"):
        fn(ids, torch.zeros(2, 6, 4), torch.zeros(2, 1, 2, 4), [P, P])
    with pytest.raises(ValueError, match="input_ids must be"):
        fn(ids[0], h, torch.zeros(2, 1, 2, 4), [P, P])
    with pytest.raises(ValueError, match="image_ids is empty"):
        fn(ids, h, torch.zeros(2, 1, 0, 4), [])
