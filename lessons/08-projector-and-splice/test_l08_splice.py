"""Grades lesson 08: the projector, window matching, the loop splice, greedy run selection and
the vectorized splice. The trusted reference is `slow_splice` below: a plain Python walk over
token lists, written independently of the tensor code under test."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

PAD = 9


def greedy_starts(matches, L):
    """Plain Python: the window starts a left-to-right scan keeps from a (B, W) bool matrix."""
    out = []
    for row in matches.tolist():
        kept, s = [], 0
        while s < len(row):
            if row[s]:
                kept.append(s)
                s += L
            else:
                s += 1
        out.append(kept)
    return out


def slow_splice(ids, h, img, image_ids):
    """Plain Python: scan each row left to right, replace non-overlapping runs with the next image."""
    out = h.clone()
    L, N = len(image_ids), img.shape[1]
    for b, row in enumerate(ids.tolist()):
        s, n = 0, 0
        while s + L <= len(row) and n < N:
            if row[s:s + L] == list(image_ids):
                out[b, s:s + L] = img[b, n]
                s, n = s + L, n + 1
            else:
                s += 1
    return out


def random_case(seed, B=3, T=24, N=2, L=3, D=4, general=False):
    g = torch.Generator().manual_seed(seed)
    image_ids = [PAD] * L if not general else [7, 8, 7][:L]
    alphabet = torch.tensor(sorted(set(image_ids) | {1, 2}))
    ids = alphabet[torch.randint(0, len(alphabet), (B, T), generator=g)]
    # mostly placeholder ids, so runs, overlapping windows and cut runs all appear
    if not general:
        ids[torch.rand(B, T, generator=g) < 0.6] = PAD
    else:
        ids[torch.rand(B, T, generator=g) < 0.3] = 8
        ids[torch.rand(B, T, generator=g) < 0.4] = 7
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64) + 3
    img = torch.randn(B, N, L, D, generator=g, dtype=torch.float64) - 3
    return ids, h, img, image_ids


# ------------------------------------------------------------------------------------ projector
def test_linear_projector_has_upstream_names(ex):
    proj = ex.VisionProjector(12, 8)
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {"vision_proj.0.weight": (8, 12), "vision_proj.0.bias": (8,)}, (
        f"state dict {shapes}: expected vision_proj.0.weight (8, 12) and vision_proj.0.bias (8,), the names of "
        "upstream's files (nn.Sequential(nn.Linear(in_dim, out_dim)) with bias)")
    x = torch.randn(2, 3, 5, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj(x), F.linear(x, proj.vision_proj[0].weight, proj.vision_proj[0].bias),
                               msg="the linear projector is not vision_proj[0](x)")


def test_mlp_projector(ex):
    proj = ex.VisionProjector(12, 8, kind="mlp")
    ln, fc1, fc2 = proj.vision_proj[0], proj.vision_proj[1], proj.vision_proj[3]
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    want = fc2(F.gelu(fc1(F.layer_norm(x, (12,), ln.weight, ln.bias, ln.eps))))
    torch.testing.assert_close(proj(x), want, msg="the mlp projector is not LayerNorm -> Linear -> GELU -> Linear")
    with pytest.raises(ValueError):
        ex.VisionProjector(12, 8, kind="attention")


# ------------------------------------------------------------------------------------ matching
def test_find_matches(ex):
    ids = torch.tensor([[1, PAD, PAD, PAD, PAD, 2], [PAD, PAD, 1, PAD, PAD, PAD]])
    m = ex.find_matches(ids, [PAD] * 3)
    assert m.dtype == torch.bool, f"find_matches returned {m.dtype}, expected bool"
    assert m.tolist() == [[False, True, True, False], [False, False, False, True]], (
        f"windows of 3 placeholders in {ids.tolist()}: got {m.int().tolist()}, expected [[0,1,1,0],[0,0,0,1]] "
        "(one entry per window start s = 0 .. T - L, True where ids[s:s+L] == image_ids; windows may overlap)")
    assert ex.find_matches(ids, [1, PAD]).tolist() == [[True, False, False, False, False],
                                                         [False, False, True, False, False]], \
        "a pattern of different ids ([1, PAD]) is matched in order"
    assert ex.find_matches(ids[:, :2], [PAD] * 3).shape == (2, 0), "rows shorter than the pattern give (B, 0)"


# ------------------------------------------------------------------------------------ the loop
def test_splice_loop_hand_built(ex):
    ids = torch.tensor([[1, PAD, PAD, 2, PAD, PAD, PAD, PAD, PAD, PAD, 3, PAD]])
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1, 12, 2, generator=g, dtype=torch.float64) + 3
    img = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64) - 3
    before = h.clone()
    out = ex.splice_loop(ids, h, img, [PAD, PAD])
    want = h.clone()
    want[0, 1:3], want[0, 4:6], want[0, 6:8] = img[0, 0], img[0, 1], img[0, 2]
    assert torch.equal(h, before), "splice_loop wrote into h: return a new tensor and leave h as it was"
    got = [n for n in range(3) if torch.equal(out[0, [1, 4, 6][n]], img[0, n, 0])]
    assert torch.equal(out, want), (
        f"ids {ids[0].tolist()}, runs of 2: images 0, 1, 2 belong at positions 1-2, 4-5, 6-7 and the run at 8-9 "
        f"stays text (only 3 images); images found in place: {got}")


@pytest.mark.parametrize("seed", range(8))
def test_splice_loop_random(ex, seed):
    ids, h, img, image_ids = random_case(seed, general=seed % 2 == 1)
    torch.testing.assert_close(ex.splice_loop(ids, h, img, image_ids), slow_splice(ids, h, img, image_ids),
                               rtol=0, atol=0, msg=lambda m: (
                                   f"image ids {image_ids}: not the left-to-right scan (runs never overlap: after a run "
                                   f"at s the next may start at s + L; n-th run <- image n; runs beyond N stay text)\n{m}"))


# ------------------------------------------------------------------------------------ vectorized
def test_select_runs(ex):
    m = torch.tensor([[True] * 10, [False, True, True, False, True, True, True, False, False, True]])
    kept = ex.select_runs(m, 3)
    assert kept.tolist()[0] == [i % 3 == 0 for i in range(10)], \
        f"10 matching windows, L=3: kept {kept[0].nonzero().flatten().tolist()}, expected [0, 3, 6, 9]"
    assert kept[1].nonzero().flatten().tolist() == [1, 4, 9], \
        f"matches at {m[1].nonzero().flatten().tolist()}, L=3: kept {kept[1].nonzero().flatten().tolist()}, expected [1, 4, 9]"


@pytest.mark.parametrize("W,L", [(700, 3), (5000, 7)])
def test_select_runs_on_long_rows(ex, W, L):
    # long chains of runs: an iteration count that is enough for T = 640 is not enough here
    g = torch.Generator().manual_seed(W)
    m = torch.rand(2, W, generator=g) < 0.9
    m[0] = True
    kept = ex.select_runs(m, L)
    want = greedy_starts(m, L)
    for b in range(2):
        got = kept[b].nonzero().flatten().tolist()
        assert got == want[b], (
            f"row {b} of {W} windows, L={L}: {len(got)} runs kept, the scan keeps {len(want[b])}; first difference at "
            f"run {next((i for i, (x, y) in enumerate(zip(got, want[b])) if x != y), min(len(got), len(want[b])))}. "
            "Does the number of pointer-jumping steps grow with W / L (ceil(log2(links)))?")


@pytest.mark.parametrize("seed", range(8))
def test_splice_random(ex, seed):
    ids, h, img, image_ids = random_case(seed, general=seed % 2 == 1)
    before = h.clone()
    out = ex.splice(ids, h, img, image_ids)
    assert torch.equal(h, before), "splice wrote into h: copy h once and write the images into the copy"
    torch.testing.assert_close(out, slow_splice(ids, h, img, image_ids), rtol=0, atol=0, msg=lambda m: (
        f"image ids {image_ids}: splice differs from the left-to-right scan\n{m}"))


@pytest.mark.parametrize("general", [False, True])
def test_splice_long_row_many_images(ex, general):
    ids, h, img, image_ids = random_case(9, B=2, T=1500, N=200, L=3, D=2, general=general)
    torch.testing.assert_close(ex.splice(ids, h, img, image_ids), slow_splice(ids, h, img, image_ids), rtol=0, atol=0,
                               msg=lambda m: f"rows of 1500 tokens with up to 200 images: splice differs from the scan\n{m}")


def test_splice_has_no_host_sync(ex):
    ids = torch.empty(2, 40, dtype=torch.long, device="meta")
    h = torch.empty(2, 40, 8, device="meta")
    img = torch.empty(2, 3, 4, 8, device="meta")
    assert ex.splice(ids, h, img, [PAD] * 4).shape == (2, 40, 8)


def test_splice_gradients(ex):
    ids, h, img, image_ids = random_case(3, B=2, T=12, D=2)
    h.requires_grad_(True)
    img.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, img: ex.splice(ids, h, img, image_ids), (h, img))
