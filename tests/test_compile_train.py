"""The training forward + loss compiles to one graph (fullgraph) and gives the eager loss and gradients."""
from __future__ import annotations

import pytest
import torch

from minimind_v.config import LMConfig
from minimind_v.lm import MiniMindLM, lm_loss
from minimind_v.train import forward_loss

TINY = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=96)


def model_and_batch(seed=0, **kw):
    torch.manual_seed(seed)
    model = MiniMindLM(LMConfig(**TINY, **kw)).train()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=g)
    labels = ids.clone()
    labels[0, :13] = -100                       # a prompt that is not trained on
    labels[1, 30:] = -100                       # padding
    return model, ids, labels


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True), dict(attn_impl="sdpa")])
def test_plain_api_loss_compiles_as_one_graph_with_eager_gradients(kw):
    model, ids, labels = model_and_batch(**kw)
    step = torch.compile(lambda x, y: lm_loss(model(x), y), fullgraph=True, backend="aot_eager")
    eager = loss_and_grads(model, lambda: lm_loss(model(ids), labels))
    assert_same(loss_and_grads(model, lambda: step(ids, labels)), eager)


def test_train_forward_loss_compiles_as_one_graph():
    """train.py's micro-batch: logits only at the answer positions, as flat indices (a gather)."""
    model, ids, labels = model_and_batch(seed=2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    batch = {"input_ids": ids, "labels": labels}
    eager = loss_and_grads(model, lambda: forward_loss(model, batch, torch.device("cpu"))[0])
    assert_same(loss_and_grads(model, lambda: forward_loss(compiled, batch, torch.device("cpu"))[0]), eager)
    # the same loss as all logits + lm_loss (the positions are right, not only compilable)
    with torch.no_grad():
        torch.testing.assert_close(eager[0], lm_loss(model(ids), labels), rtol=1e-6, atol=1e-6)


def inductor_compiles() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(2)).eq(3).all())
    except Exception:              # no C++ compiler, unsupported platform, ...
        return False


@pytest.mark.skipif(not inductor_compiles(), reason="torch.compile (inductor) cannot compile here")
def test_inductor_training_step_equals_eager():
    """The generated C++ kernels (fused elementwise ops, forward and backward), not only the capture."""
    model, ids, labels = model_and_batch(seed=3)
    step = torch.compile(lambda x, y: lm_loss(model(x), y), fullgraph=True)
    eager = loss_and_grads(model, lambda: lm_loss(model(ids), labels))
    assert_same(loss_and_grads(model, lambda: step(ids, labels)), eager, tol=1e-4)
