"""The fused RMSNorm custom op (kernels/ + minimind_v.ops) against the eager reference.

Eager `minimind_v.norm.rms_norm` with autograd is the trusted reference: forward, dx and dw must
match at awkward sizes, dtypes and layouts. The op must also satisfy torch.library.opcheck, pass
gradcheck in float64, run under torch.compile(fullgraph=True), and a MiniMindLM must train the
same step with either norm implementation.
"""
from __future__ import annotations

import pytest
import torch

from minimind_v.norm import RMSNorm, rms_norm

from minimind_v import kernel_build, ops

ops.load()   # build the kernels now, so the internal ops (forward, backward) exist for the tests below

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}
# gradients in half precision are compared to the fp32-accumulated eager result, loosely
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
            torch.bfloat16: dict(atol=1e-1, rtol=5e-2), torch.float16: dict(atol=2e-2, rtol=1e-2)}


def make_inputs(shape, dtype, w_dtype=None, contiguous=True, seed=0, device="cpu"):
    """x (shape) with non-trivial values, weight (D,) in [0.5, 1.5), grad_y (shape) float32."""
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    if contiguous:
        x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    else:  # same shape, a transposed view of a larger buffer with a gap: strides are not (..., D, 1)
        rows = shape[-2] if len(shape) >= 2 else 1
        big = (torch.randn(*shape[:-2], D, rows + 3, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
        x = big[..., :rows].transpose(-1, -2).reshape(shape) if len(shape) >= 2 else big[:, 0]
        assert not x.is_contiguous() and x.shape == torch.Size(shape)
    w = (torch.rand(D, generator=g) + 0.5).to(device=device, dtype=w_dtype or dtype)
    gy = torch.randn(shape, generator=g).to(device)
    return x, w, gy


def run(fn, x, w, gy, eps):
    x = x.detach().clone().requires_grad_(True) if x.is_contiguous() else x.detach().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps)
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def check_against_eager(shape, dtype, w_dtype=None, contiguous=True, eps=1e-5, device="cpu"):
    x, w, gy = make_inputs(shape, dtype, w_dtype, contiguous, device=device)
    y_ref, dx_ref, dw_ref = run(rms_norm, x, w, gy, eps)
    y, dx, dw = run(ops.fused_rms_norm, x, w, gy, eps)
    assert y.dtype == y_ref.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == w.shape
    tol, gtol = TOL[dtype], GRAD_TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(dx.float(), dx_ref.float(), **gtol)
    # dw sums over all rows: scale the tolerance with the row count for the half precisions
    rows = x.numel() // shape[-1]
    dw_tol = gtol if dtype in (torch.float32, torch.float64) else \
        dict(atol=gtol["atol"] * rows ** 0.5, rtol=gtol["rtol"])
    torch.testing.assert_close(dw.float(), dw_ref.float(), **dw_tol)


SHAPES = [(1, 1), (1, 50), (7, 50), (2, 3, 4097), (300, 50), (64, 512), (5, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_eager(shape, dtype):
    check_against_eager(shape, dtype)


@pytest.mark.parametrize("shape", [(7, 50), (2, 5, 33), (40, 4097)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_eager_non_contiguous(shape, dtype):
    check_against_eager(shape, dtype, contiguous=False)


def test_float64_matches_eager():
    check_against_eager((9, 70), torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_input_with_float32_weight_promotes_like_eager(dtype):
    # what autocast gives the model: bf16 activations, float32 RMSNorm weight -> float32 output
    check_against_eager((33, 96), dtype, w_dtype=torch.float32)


def test_forward_float32_is_close_to_bitwise():
    x, w, _ = make_inputs((128, 512), torch.float32)
    torch.testing.assert_close(ops.fused_rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6), atol=2e-6, rtol=1e-6)


def test_rstd_is_the_reciprocal_rms():
    x, w, _ = make_inputs((4, 6, 40), torch.bfloat16)
    y, rstd = torch.ops.minimind.fused_rms_norm_forward(x, w, 1e-5)
    assert rstd.shape == (4, 6) and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5))


def test_dw_is_deterministic_across_thread_counts():
    x, w, gy = make_inputs((1000, 96), torch.float32, seed=3)
    _, rstd = torch.ops.minimind.fused_rms_norm_forward(x, w, 1e-5)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(torch.ops.minimind.fused_rms_norm_backward(gy, x, w, rstd))
    finally:
        torch.set_num_threads(old)
    for dx, dw in results[1:]:
        assert torch.equal(dw, results[0][1]) and torch.equal(dx, results[0][0])


def test_empty_input():
    x = torch.randn(0, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = ops.fused_rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))


def test_gradcheck_float64():
    x, w, _ = make_inputs((5, 13), torch.float64, seed=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ops.fused_rms_norm(a, b, 1e-5), (x, w))


@pytest.mark.parametrize("shape,dtype", [((3, 50), torch.float32), ((2, 3, 17), torch.float64),
                                         ((4, 64), torch.bfloat16), ((1, 1), torch.float16)], ids=str)
def test_opcheck(shape, dtype):
    x, w, gy = make_inputs(shape, dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.minimind.fused_rms_norm_forward, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.minimind.fused_rms_norm, (x, w, 1e-5))
    _, rstd = torch.ops.minimind.fused_rms_norm_forward(x.detach(), w.detach(), 1e-5)
    torch.library.opcheck(torch.ops.minimind.fused_rms_norm_backward,
                          (gy.to(dtype), x.detach(), w.detach(), rstd))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    norm = RMSNorm(48, impl="fused")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)

    def f(x):
        return norm(x * 2.0).sin().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, _, _ = make_inputs((3, 5, 48), torch.float32)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out = compiled(x1)
    out.backward()
    ref = rms_norm(x2 * 2.0, norm.weight.detach(), norm.eps).sin().sum()
    ref.backward()
    torch.testing.assert_close(out, ref.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_rmsnorm_module_fused_matches_eager():
    torch.manual_seed(0)
    eager, fused = RMSNorm(64, 1e-6, "eager"), RMSNorm(64, 1e-6, "fused")
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        fused.weight.copy_(eager.weight)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(fused(x), eager(x), atol=1e-6, rtol=1e-5)


def test_lm_training_step_fused_matches_eager():
    from minimind_v.config import LMConfig
    from minimind_v.lm import MiniMindLM

    def step(norm_impl):
        torch.manual_seed(0)
        cfg = LMConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       max_seq_len=64, norm_impl=norm_impl)
        model = MiniMindLM(cfg)
        with torch.no_grad():   # non-trivial norm weights, so dw and w both matter
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(2):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses, dict(model.named_parameters())

    (l_e, p_e), (l_f, p_f) = step("eager"), step("fused")
    torch.testing.assert_close(torch.stack(l_f), torch.stack(l_e), atol=1e-5, rtol=1e-5)
    assert any("norm" in n for n in p_e)
    for name in p_e:
        torch.testing.assert_close(p_f[name], p_e[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_bad_input_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="weight has 7 elements but x's last dimension is 8"):
        ops.fused_rms_norm(torch.randn(3, 8), torch.ones(7))
    with pytest.raises(RuntimeError, match="must be float32, float64, bfloat16 or float16"):
        ops.fused_rms_norm(torch.ones(3, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="unsupported dtype pair"):
        ops.fused_rms_norm(torch.randn(3, 8, dtype=torch.float16), torch.ones(8, dtype=torch.float64))
    # and a good call right after works
    assert ops.fused_rms_norm(torch.randn(3, 8), torch.ones(8)).shape == (3, 8)


def test_import_compiles_nothing(tmp_path):
    """`import minimind_v.ops` builds no kernel; the first fused call does (in a fresh process)."""
    import os
    import subprocess
    import sys
    code = ("import minimind_v.ops as ops, minimind_v.kernel_build as kb, torch;"
            "assert kb.BUILD_DIR is None, 'built at import';"
            "assert hasattr(torch.ops.minimind, 'fused_rms_norm');"
            "ops.fused_rms_norm(torch.randn(2, 4), torch.ones(4));"
            "assert kb.BUILD_DIR is not None")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_missing_compiler_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no-such-compiler-xyz.*is not on PATH.*norm_impl='eager'"):
        kernel_build._check_toolchain(with_cuda=False)
    monkeypatch.undo()
    kernel_build._check_toolchain(with_cuda=False)   # the real toolchain (it built the op) passes


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="CUDA is not available: the CUDA kernel (kernels/rmsnorm.cu) is not built")


@requires_cuda
@pytest.mark.parametrize("shape", [(1, 1), (7, 50), (2, 3, 4097), (300, 512), (64, 768)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_eager(shape, dtype):
    check_against_eager(shape, dtype, device="cuda")
    check_against_eager(shape, dtype, device="cuda", contiguous=False)


@requires_cuda
def test_cuda_opcheck_and_mixed_dtype():
    x, w, _ = make_inputs((33, 256), torch.bfloat16, w_dtype=torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.minimind.fused_rms_norm_forward, (x.requires_grad_(True), w, 1e-5))
    check_against_eager((33, 256), torch.bfloat16, w_dtype=torch.float32, device="cuda")


def test_lm_under_bf16_autocast_fused_matches_eager():
    from minimind_v.config import LMConfig
    from minimind_v.lm import MiniMindLM

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    logits = {}
    for impl in ("eager", "fused"):
        torch.manual_seed(0)
        model = MiniMindLM(LMConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_seq_len=64, norm_impl=impl))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[impl] = model(ids).float()
    assert logits["eager"].abs().max() > 0
    torch.testing.assert_close(logits["fused"], logits["eager"], atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- impl="auto", the default
def _fused_ran(module, x) -> bool:
    from torch.profiler import profile
    with profile() as prof:
        module(x)
    return any("minimind::fused_rms_norm" in e.key for e in prof.key_averages())


def test_auto_is_the_default_and_runs_the_fused_op_on_a_cpu_only():
    from minimind_v.config import LMConfig
    assert LMConfig().norm_impl == "auto" and RMSNorm(8).impl == "auto"
    torch.manual_seed(0)
    auto, eager = RMSNorm(32), RMSNorm(32, impl="eager")
    with torch.no_grad():
        auto.weight.uniform_(0.5, 1.5)
        eager.weight.copy_(auto.weight)
    x = torch.randn(3, 7, 32)
    assert _fused_ran(auto, x) and not _fused_ran(eager, x)
    torch.testing.assert_close(auto(x), eager(x), atol=1e-6, rtol=1e-5)
    y = RMSNorm(32).to("meta")(torch.empty(2, 32, device="meta"))   # another device: the eager ops
    assert y.device.type == "meta" and y.shape == (2, 32)


def test_auto_runs_a_replaced_rms_norm(monkeypatch):
    """Learner mode replaces `norm.rms_norm`; "auto" must then run that function, not the kernel."""
    from minimind_v import norm
    calls = []

    def mine(x, weight, eps=1e-5):
        calls.append(x.shape)
        return norm._REFERENCE_RMS_NORM(x, weight, eps)

    monkeypatch.setattr(norm, "rms_norm", mine)
    x = torch.randn(4, 16)
    assert not _fused_ran(RMSNorm(16), x) and calls == [(4, 16)]


def test_auto_falls_back_to_eager_with_one_warning_where_the_kernels_cannot_run(monkeypatch):
    def cannot(verbose=False):
        raise RuntimeError("missing a C++ compiler ('c++' is not on PATH)")

    monkeypatch.setattr(ops, "_available", None)
    monkeypatch.setattr(ops, "load", cannot)
    torch.manual_seed(0)
    auto, x = RMSNorm(16), torch.randn(5, 16)
    with pytest.warns(UserWarning, match=r"RMSNorm runs its eager ops.*'c\+\+' is not on PATH"):
        y = auto(x)
    torch.testing.assert_close(y, rms_norm(x, auto.weight, auto.eps), atol=0, rtol=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # said once: no second warning
        auto(x)
    assert ops._available is False


# ----------------------------------------------------------------------------- under CPU autocast
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_under_autocast_y_comes_in_autocast_dtype_with_the_same_bits_and_gradients(low):
    """RMSNorm under CPU autocast writes y in autocast's dtype: the bits the next product's cast
    makes of the float32 y, and the same gradients (the kernel reads the low-precision gradient)."""
    x, w, _ = make_inputs((3, 37, 64), torch.float32, seed=3)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    gy = torch.randn(3, 37, 48, generator=torch.Generator().manual_seed(5))

    def run(norm):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=low):
            y = norm(xi, wi)
            out = torch.nn.functional.linear(y, W)
        (out.float() * gy).sum().backward()
        return y, xi.grad, wi.grad

    module = RMSNorm(64)                                            # "auto": fused on a CPU
    y, dx, dw = run(lambda xi, wi: torch.func.functional_call(module, {"weight": wi}, (xi,)))
    y_ref, dx_ref, dw_ref = run(lambda xi, wi: ops.fused_rms_norm(xi, wi, 1e-5))
    assert y.dtype == low and y_ref.dtype == torch.float32
    assert torch.equal(y, y_ref.to(low))
    assert torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)
    assert module(x).dtype == torch.float32                         # outside autocast: float32


def test_forward_to_opcheck_and_bad_input():
    x, w, _ = make_inputs((4, 9, 40), torch.float32, seed=6)
    torch.library.opcheck(torch.ops.minimind.fused_rms_norm_forward_to, (x, w, 1e-5, torch.bfloat16))
    with pytest.raises(RuntimeError, match="x and weight must be float32"):
        torch.ops.minimind.fused_rms_norm_forward_to(x.bfloat16(), w, 1e-5, torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype must be bfloat16 or float16"):
        torch.ops.minimind.fused_rms_norm_forward_to(x, w, 1e-5, torch.float64)
