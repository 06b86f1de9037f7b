"""minimind_v.linear: the few-rows product equals F.linear, and Linear is nn.Linear to a checkpoint."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minimind_v import linear
from minimind_v.linear import FEW_ROWS, Linear, few_rows_linear, shared_input_linear


@pytest.mark.parametrize("n_out", [512, 1408, 6400, 132, 50, 7])      # blocks of 8, 8, 8, 4, 2, 1
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_equals_f_linear(n_out, rows, bias):
    g = torch.Generator().manual_seed(n_out * 10 + rows)
    w = torch.randn(n_out, 96, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    x = torch.randn(rows, 96, generator=g)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = few_rows_linear(x, w, b)
    assert got.shape == (rows, n_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_few_rows_linear_keeps_leading_dims():
    w, x = torch.randn(64, 32), torch.randn(2, 1, 32)                   # a decode step of two sequences
    got = few_rows_linear(x, w)
    assert got.shape == (2, 1, 64)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_takes_the_few_rows_path_only_for_few_float32_rows(monkeypatch):
    monkeypatch.setattr(linear, "FEW_ROWS_BATCHED", True)            # as on an AMD CPU
    torch.manual_seed(0)
    layer = Linear(48, 40)
    few = torch.randn(1, FEW_ROWS, 48)
    many = torch.randn(1, FEW_ROWS + 1, 48)
    assert torch.equal(layer(few), few_rows_linear(few, layer.weight, layer.bias))
    assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
    x64 = few.double()
    layer64 = Linear(48, 40).double()
    assert torch.equal(layer64(x64), F.linear(x64, layer64.weight, layer64.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):                    # autocast decides, as in nn.Linear
        assert layer(few).dtype == torch.bfloat16
    monkeypatch.setattr(linear, "FEW_ROWS_BATCHED", False)           # as on an Intel CPU: F.linear
    assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))


def test_the_batched_form_is_chosen_by_cpu_vendor():
    assert linear.batched_is_faster("AuthenticAMD", mkl=True)
    assert not linear.batched_is_faster("GenuineIntel", mkl=True)
    assert not linear.batched_is_faster("AuthenticAMD", mkl=False)          # another BLAS: unmeasured
    assert not linear.batched_is_faster("", mkl=True)                        # unknown: torch's own
    assert linear.FEW_ROWS_BATCHED == linear.batched_is_faster(linear._cpu_vendor(),
                                                                torch.backends.mkl.is_available())


def test_linear_is_nn_linear_to_a_checkpoint_and_to_autograd():
    torch.manual_seed(1)
    plain, ours = nn.Linear(24, 16), Linear(24, 16)
    assert set(ours.state_dict()) == set(plain.state_dict()) == {"weight", "bias"}
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(3, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ours(x).square().sum().backward()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-6)


def _three_layers(dtype=torch.float64):
    torch.manual_seed(0)
    return [Linear(48, n, bias=False).to(dtype) for n in (64, 16, 16)]


STACKED = dict(device_type="cpu", dtype=torch.bfloat16)   # autocast, where the product is stacked;
# float64 tensors are not cast by autocast, so these tests compare the stacked path in float64


def test_shared_input_linear_equals_the_separate_layers_and_their_gradients():
    layers = _three_layers()
    x = torch.randn(3, 20, 48, dtype=torch.float64, requires_grad=True)
    with torch.autocast(**STACKED):
        got = shared_input_linear(x, *layers)
    assert got[0]._base is not None                       # column slices of one product
    want = [layer(x) for layer in layers]
    assert [g.shape for g in got] == [(3, 20, 64), (3, 20, 16), (3, 20, 16)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # a different weight on each output, so a gradient in the wrong columns shows
    weights = [torch.randn_like(w) for w in want]
    grads_got = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, weights)),
                                    [x] + [layer.weight for layer in layers])
    grads_want = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, weights)),
                                     [x] + [layer.weight for layer in layers])
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_shared_input_linear_with_an_unused_output():
    layers = _three_layers()
    x = torch.randn(2, 12, 48, dtype=torch.float64, requires_grad=True)
    with torch.autocast(**STACKED):
        q, k, v = shared_input_linear(x, *layers)
    (q.sum() + v.square().sum()).backward()                                # k unused: no gradient
    assert torch.equal(layers[1].weight.grad, torch.zeros_like(layers[1].weight))
    got = [x.grad] + [layer.weight.grad for layer in layers]
    x.grad = None
    for layer in layers:
        layer.weight.grad = None
    (layers[0](x).sum() + layers[2](x).square().sum()).backward()
    for g, w in zip(got, [x.grad] + [layer.weight.grad for layer in layers]):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-12, atol=1e-12)


def test_shared_input_linear_keeps_the_separate_layers_outside_autocast_for_few_rows_and_biases():
    layers = _three_layers(torch.float32)
    many = torch.randn(2, 30, 48)
    for g, layer in zip(shared_input_linear(many, *layers), layers):        # float32: separate
        assert torch.equal(g, layer(many)) and g._base is None
    few = torch.randn(1, FEW_ROWS, 48)
    with torch.autocast(**STACKED):
        for g, layer in zip(shared_input_linear(few, *layers), layers):
            assert torch.equal(g, layer(few))                               # decoding: separate
        torch.manual_seed(1)
        biased = [Linear(48, 8), Linear(48, 8)]
        for g, layer in zip(shared_input_linear(many, *biased), biased):
            assert torch.equal(g, layer(many))


def test_shared_input_linear_under_bf16_autocast():
    layers = _three_layers(torch.float32)
    x = torch.randn(4, 30, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = shared_input_linear(x, *layers)
        want = [layer(x) for layer in layers]
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=8e-3, atol=1e-5)   # at most one bf16 step
