"""Grades lesson 08: the projector, window matching, the loop splice, greedy run selection and
the vectorized splice. The trusted reference is `slow_splice` below: a plain Python walk over
token lists, written independently of the tensor code under test."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

PAD = 9


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
    assert shapes == {"vision_proj.0.weight": (8, 12), "vision_proj.0.bias": (8,)}
    x = torch.randn(2, 3, 5, 12)
    torch.testing.assert_close(proj(x), F.linear(x, proj.vision_proj[0].weight, proj.vision_proj[0].bias))


def test_mlp_projector(ex):
    proj = ex.VisionProjector(12, 8, kind="mlp")
    ln, fc1, fc2 = proj.vision_proj[0], proj.vision_proj[1], proj.vision_proj[3]
    x = torch.randn(4, 12)
    want = fc2(F.gelu(fc1(F.layer_norm(x, (12,), ln.weight, ln.bias, ln.eps))))
    torch.testing.assert_close(proj(x), want)
    with pytest.raises(ValueError):
        ex.VisionProjector(12, 8, kind="attention")


# ------------------------------------------------------------------------------------ matching
def test_find_matches(ex):
    ids = torch.tensor([[1, PAD, PAD, PAD, PAD, 2], [PAD, PAD, 1, PAD, PAD, PAD]])
    m = ex.find_matches(ids, [PAD] * 3)
    assert m.dtype == torch.bool
    assert m.tolist() == [[False, True, True, False], [False, False, False, True]]
    assert ex.find_matches(ids, [1, PAD]).tolist() == [[True, False, False, False, False],
                                                         [False, False, True, False, False]]
    assert ex.find_matches(ids[:, :2], [PAD] * 3).shape == (2, 0)


# ------------------------------------------------------------------------------------ the loop
def test_splice_loop_hand_built(ex):
    ids = torch.tensor([[1, PAD, PAD, 2, PAD, PAD, PAD, PAD, PAD, PAD, 3, PAD]])
    h = torch.randn(1, 12, 2, dtype=torch.float64) + 3
    img = torch.randn(1, 3, 2, 2, dtype=torch.float64) - 3
    out = ex.splice_loop(ids, h, img, [PAD, PAD])
    want = h.clone()
    want[0, 1:3], want[0, 4:6], want[0, 6:8] = img[0, 0], img[0, 1], img[0, 2]
    torch.testing.assert_close(out, want, rtol=0, atol=0)   # images 0, 1, 2; the 4th run stays text
    assert (h > 0).all()                                     # h untouched


@pytest.mark.parametrize("seed", range(8))
def test_splice_loop_random(ex, seed):
    ids, h, img, image_ids = random_case(seed, general=seed % 2 == 1)
    torch.testing.assert_close(ex.splice_loop(ids, h, img, image_ids), slow_splice(ids, h, img, image_ids),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------ vectorized
def test_select_runs(ex):
    m = torch.tensor([[True] * 10, [False, True, True, False, True, True, True, False, False, True]])
    kept = ex.select_runs(m, 3)
    assert kept.tolist()[0] == [i % 3 == 0 for i in range(10)]
    assert kept[1].nonzero().flatten().tolist() == [1, 4, 9]


@pytest.mark.parametrize("seed", range(8))
def test_splice_random(ex, seed):
    ids, h, img, image_ids = random_case(seed, general=seed % 2 == 1)
    torch.testing.assert_close(ex.splice(ids, h, img, image_ids), slow_splice(ids, h, img, image_ids),
                               rtol=0, atol=0)


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
