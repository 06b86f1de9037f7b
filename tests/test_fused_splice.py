"""The fused splice kernel (kernels/splice.cpp + minimind_v.ops.fused_splice) against the references.

`splice_loop` (upstream MiniMind-V's algorithm, written plainly) is the trusted reference for the values and `splice` (torch
autograd through index ops) for the gradients: both are pure copies, so results must be bitwise
equal. The op must also pass torch.library.opcheck and gradcheck, trace under
torch.compile(fullgraph=True), and reject inconsistent starts with a message that names them.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from minimind_v import ops
from minimind_v.splice import image_starts, splice, splice_loop
from test_splice import P, batches, rand   # the splice tests' placeholder id, random batches, vectors

ops.load()   # the internal ops (image_starts, splice_rows) exist once the kernels are loaded


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_fused_splice_equals_splice_loop_on_random_batches(case):
    ids, image_ids, N, seed = case
    B, T = ids.shape
    h, img = rand(B, T, N, len(image_ids), seed=seed)
    assert torch.equal(ops.fused_splice(ids, h, img, image_ids), splice_loop(ids, h, img, image_ids))
    # the C++ scan finds the same starts as the vectorized search
    starts = torch.ops.minimind.image_starts(ids, torch.tensor(image_ids), N)
    assert torch.equal(starts, image_starts(ids, image_ids, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_real_shapes_every_dtype(dtype):
    # two 196-id images per row at different places, a row with one, a row with none, a cut run
    T, L = 640, 196
    ids = torch.randint(100, 6400, (4, T), generator=torch.Generator().manual_seed(0))
    ids[0, 10:10 + L] = 34
    ids[0, 300:300 + L] = 34
    ids[1, 0:L] = 34
    ids[3, T - 100:] = 34                               # cut by the end of the row: stays text
    h, img = rand(4, T, 2, L, D=64, seed=1, dtype=dtype)
    out = ops.fused_splice(ids, h, img, [34] * L)
    assert out.dtype == dtype
    assert torch.equal(out, splice_loop(ids, h, img, [34] * L))


def test_non_contiguous_inputs_and_image_dtype_follow_h():
    ids = torch.tensor([[1, P, P, 2, P, P, P], [P, P, 1, 1, 1, 1, 1]])
    h, img = rand(2, 7, 2, 2, D=6, seed=2, dtype=torch.float64)
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1)          # same values, other strides
    img_f = img.float().transpose(2, 3).contiguous().transpose(2, 3)   # float32 and strided
    assert not h_t.is_contiguous() and not img_f.is_contiguous()
    out = ops.fused_splice(ids, h_t, img_f, [P, P])
    assert out.dtype == torch.float64
    assert torch.equal(out, splice_loop(ids, h, img_f, [P, P]))


def test_gradients_equal_the_vectorized_splice():
    ids = torch.tensor([[1, P, P, 2, P, P, P], [P, P, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    w = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (ops.fused_splice, splice):
        h, img = rand(3, 7, 3, 2, D=5, seed=4)
        h.requires_grad_(True)
        img.requires_grad_(True)
        (fn(ids, h, img, [P, P]) * w).sum().backward()
        grads.append((h.grad, img.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    h_grad, img_grad = grads[0]
    assert (h_grad[0, 1:3] == 0).all() and (h_grad[0, 0] != 0).all()     # replaced text: no gradient
    assert (img_grad[0, :2] != 0).all() and (img_grad[1, 1:] == 0).all()  # unused images: none


def test_gradcheck_and_opcheck():
    ids = torch.tensor([[1, P, P, 2, P, P, P], [P, P, 1, 1, 1, 1, 1]])
    h, img = rand(2, 7, 3, 2, D=2, seed=3, dtype=torch.float64)
    h.requires_grad_(True)
    img.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, img: ops.fused_splice(ids, h, img, [P, P]), (h, img))
    starts = image_starts(ids, [P, P], 3)
    assert starts.tolist() == [[1, 4, 7], [0, 7, 7]]
    torch.library.opcheck(torch.ops.minimind.splice_rows, (h, img, starts))
    torch.library.opcheck(torch.ops.minimind.image_starts, (ids, torch.tensor([P, P]), 3))
    torch.library.opcheck(torch.ops.minimind.splice_rows_backward, (torch.randn(2, 7, 2, dtype=torch.float64),
                                                                    starts, 2))


def test_compiles_without_graph_break():
    compiled = torch.compile(ops.fused_splice, fullgraph=True, backend="aot_eager")
    ids = torch.tensor([[1, P, P, 2, P, P, P, P], [P, P, 1, 1, 1, 1, 1, P]])
    h, img = rand(2, 8, 2, 2, D=4, seed=6)
    h.requires_grad_(True)
    out = compiled(ids, h, img, [P, P])
    assert torch.equal(out, splice_loop(ids, h, img, [P, P]))
    out.sum().backward()
    assert torch.equal(h.grad[0, 1:3], torch.zeros(2, 4)) and torch.equal(h.grad[0, 0], torch.ones(4))


@pytest.mark.parametrize("starts, message", [
    ([[1, 2]], "overlaps the previous image"),     # second image starts inside the first
    ([[6, 7]], "runs past the row"),               # 6 + L > T
    ([[-1, 7]], "outside"),
    ([[0, 8]], "outside"),
    ([[0]], "starts must be"),                     # wrong N
])
def test_bad_starts_are_named(starts, message):
    h, img = rand(1, 7, 2, 2)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.minimind.splice_rows(h, img, torch.tensor(starts))
