"""Grades lesson 12 against plain loops written here and torch's own RMSNorm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


def test_head_rms_norm_normalises_each_head(ex):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 16, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 3.0, 10.0],
                                                                                  dtype=torch.float64)[:, None]
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    y = ex.head_rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype
    for h in range(4):                                   # head by head, with torch's RMSNorm
        torch.testing.assert_close(y[:, :, h], F.rms_norm(x[:, :, h], (16,), w, eps=1e-6))
    # every head ends at the same scale although they started 100x apart
    rms = (y / w).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)      # eps aside


def loop_route(logits, k, norm):
    probs = torch.softmax(logits.double(), -1)
    weights, experts = [], []
    for row in probs:
        best = sorted(range(len(row)), key=lambda e: -row[e].item())[:k]
        w = torch.stack([row[e] for e in best])
        weights.append(w / (w.sum() + 1e-20) if norm else w)
        experts.append(best)
    return probs, torch.stack(weights), torch.tensor(experts)


@pytest.mark.parametrize("k,norm", [(1, True), (2, True), (2, False)])
def test_route_equals_a_loop(ex, k, norm):
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 2
    probs, weights, experts = ex.route(logits, k, norm)
    ref = loop_route(logits, k, norm)
    torch.testing.assert_close(probs, ref[0])
    torch.testing.assert_close(weights, ref[1])
    assert torch.equal(experts, ref[2]) and experts.dtype == torch.long
    if k == 1 and norm:
        torch.testing.assert_close(weights, torch.ones(9, 1, dtype=torch.float64))


def test_load_balancing_loss(ex):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    experts = probs.topk(2, dim=-1).indices
    loss = ex.load_balancing_loss(probs, experts, 4)
    f = [sum(int(e) == j for row in experts for e in row) / 12 for j in range(4)]
    want = 4 * sum(f[j] * probs[:, j].mean() for j in range(4))
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() > 1e-3                       # P_e carries the gradient into the router
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    balanced = torch.arange(8)[:, None] % 4              # every expert chosen twice
    torch.testing.assert_close(ex.load_balancing_loss(uniform, balanced, 4), torch.tensor(1.0, dtype=torch.float64))
    collapsed = torch.zeros(8, 1, dtype=torch.long)      # all tokens to expert 0, which has prob 1
    onehot = F.one_hot(torch.zeros(8, dtype=torch.long), 4).double()
    torch.testing.assert_close(ex.load_balancing_loss(onehot, collapsed, 4), torch.tensor(4.0, dtype=torch.float64))


@pytest.mark.parametrize("resample,filt", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_preprocess_siglip(ex, resample, filt):
    rng = np.random.default_rng(0)
    for img in (Image.fromarray(rng.integers(0, 256, (70, 130, 3), dtype=np.uint8), "RGB"),
                Image.fromarray(rng.integers(0, 256, (90, 40, 4), dtype=np.uint8), "RGBA")):
        x = ex.preprocess_siglip(img, 64, resample)
        arr = np.asarray(img.convert("RGB").resize((64, 64), resample=filt))
        want = ((arr.astype(np.float64) / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        torch.testing.assert_close(x, torch.from_numpy(want.transpose(2, 0, 1).copy()), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        ex.preprocess_siglip(img, 64, "box")
