"""The fused ops: registrations and the two public functions, `fused_rms_norm` and `fused_splice`.

Eager `rms_norm` (minimind_v.norm) is five or six kernels forward (square, mean, rsqrt, two
multiplies), each a full pass over memory, and autograd keeps their intermediates for backward.
The fused RMSNorm does one pass per row forward and one pass per row backward, and saves only the
per-row reciprocal RMS `rstd` (one number per row). Where it sits: `RMSNorm(impl="fused")`.

    forward    r = 1 / sqrt(mean(x^2) + eps)            (one per row)
               y = w * cast_x(x * r)                      (cast_x: round to x's dtype, as eager does)
    backward   dx = r * (g*w - x * r^2 * mean(g*w*x))
               dw = sum over rows of g * cast_x(x * r)

The same math in torch ops, with the backward derived by hand, is `norm.rms_norm_forward`,
`norm.rms_norm_backward` and `norm.RMSNormFunction` (lesson 11); the C++/CUDA kernels in
`kernels/` implement exactly that. The fused splice (`kernels/splice.cpp`) is the result of
`minimind_v.splice.splice` with every output row written once (lesson 08).

Importing this module compiles nothing. It defines the public op
`minimind::fused_rms_norm(x, weight, eps) -> y`, so `torch.ops.minimind.fused_rms_norm` exists at
once; the first call of a fused op runs `load()`, which builds or loads the kernels
(`kernel_build.py`) and registers, for the ops the C++ defines, fake (meta) kernels, so
`torch.compile` and `opcheck` can trace shapes without running C++, and the autograd formulas
(forward saves x, w, rstd; backward calls the backward op). Dtypes: y has promote(x, w)'s dtype
(bf16 x with a float32 weight, as under autocast, gives float32, exactly like eager `rms_norm`);
statistics are float32 (float64 for float64 x).
"""
from __future__ import annotations

import threading
import warnings

import torch

from . import kernel_build
from .splice import check_splice_args, splice

_registered = False
_lock = threading.Lock()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)   # the statistics' dtype: float32, or float64


def load(verbose: bool = False):
    """Build/load the kernels and register their fake kernels and autograd, once; returns the build folder."""
    global _registered
    if _registered:                       # the usual case: one global read (torch.compile traces it)
        return kernel_build.BUILD_DIR
    build_dir = kernel_build.load(verbose=verbose)
    with _lock:
        if not _registered:
            _register()
            _registered = True
    return build_dir


_available: bool | None = None


def available() -> bool:
    """Whether the kernels can run in this process, building or loading them on the first call.
    Where they cannot (no C++ compiler, no ninja, no `kernels/` sources next to the package, a
    failed build) this warns once, with the reason, and returns False: `RMSNorm(impl="auto")` then
    runs the eager ops."""
    global _available
    if _available is None:
        try:
            load()
            _available = True
        except (RuntimeError, OSError, ImportError) as e:
            _available = False
            warnings.warn(f"minimind_v: the fused RMSNorm kernels cannot run here, so RMSNorm runs its "
                          f"eager ops (the same numbers, slower): {e}", stacklevel=2)
    return _available


def __getattr__(name):
    if name == "BUILD_DIR":               # where the kernels were built (building them if needed)
        return load()
    raise AttributeError(name)


def _register() -> None:
    """Fake kernels and autograd for the ops that `kernels/*.cpp` define (run after the library loads)."""
    # -- RMSNorm
    @torch.library.register_fake("minimind::fused_rms_norm_forward")
    def _forward_fake(x, weight, eps):
        y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))    # (..., D)
        rstd = x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))                  # (...,)
        return y, rstd


    @torch.library.register_fake("minimind::fused_rms_norm_backward")
    def _backward_fake(grad_y, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)


    def _setup_context(ctx, inputs, output):
        x, weight, _eps = inputs
        _y, rstd = output
        ctx.save_for_backward(x, weight, rstd)   # the only activation saved is rstd (one per row)


    def _backward(ctx, grad_y, _grad_rstd):
        # rstd is an internal statistic; a gradient flowing into it is not supported (it is ignored)
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.minimind.fused_rms_norm_backward(grad_y, x, weight, rstd)
        return dx, dw, None


    torch.library.register_autograd("minimind::fused_rms_norm_forward", _backward, setup_context=_setup_context)

    @torch.library.register_fake("minimind::fused_rms_norm_forward_to")
    def _forward_to_fake(x, weight, eps, dtype):
        return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1])

    def _setup_context_to(ctx, inputs, output):
        x, weight, _eps, _dtype = inputs
        ctx.save_for_backward(x, weight, output[1])

    def _backward_to(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors   # grad_y in the low dtype: the kernel reads it as it is
        dx, dw = torch.ops.minimind.fused_rms_norm_backward(grad_y, x, weight, rstd)
        return dx, dw, None, None

    torch.library.register_autograd("minimind::fused_rms_norm_forward_to", _backward_to,
                                    setup_context=_setup_context_to)

    # -- the splice
    @torch.library.register_fake("minimind::splice_rows")
    def _splice_rows_fake(h, images, starts):
        return h.new_empty(h.shape)                                                 # (B, T, D)


    @torch.library.register_fake("minimind::splice_rows_backward")
    def _splice_rows_backward_fake(grad, starts, L):
        B, T, D = grad.shape
        return grad.new_empty(grad.shape), grad.new_empty(B, starts.shape[1], L, D)


    @torch.library.register_fake("minimind::image_starts")
    def _image_starts_fake(input_ids, pattern, N):
        return input_ids.new_empty(input_ids.shape[0], N, dtype=torch.long)          # (B, N)


    def _splice_setup_context(ctx, inputs, output):
        _h, images, starts = inputs
        ctx.save_for_backward(starts)
        ctx.L = images.shape[2]


    def _splice_backward(ctx, grad):
        (starts,) = ctx.saved_tensors
        grad_h, grad_images = torch.ops.minimind.splice_rows_backward(grad, starts, ctx.L)
        return grad_h, grad_images, None


    torch.library.register_autograd("minimind::splice_rows", _splice_backward, setup_context=_splice_setup_context)


# ---------------------------------------------------------------------------------------------
# The public RMSNorm op: y only. A composite of the forward op, so autograd, fake tensors and
# torch.compile all go through the forward op's registrations above.
# ---------------------------------------------------------------------------------------------
_lib = torch.library.Library("minimind", "FRAGMENT")
_lib.define("fused_rms_norm(Tensor x, Tensor weight, float eps=1e-05) -> Tensor")


def _fused_rms_norm_composite(x, weight, eps=1e-5):
    load()
    return torch.ops.minimind.fused_rms_norm_forward(x, weight, eps)[0]


_lib.impl("fused_rms_norm", _fused_rms_norm_composite, "CompositeImplicitAutograd")


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D): the fused kernel, same result as `norm.rms_norm`."""
    return torch.ops.minimind.fused_rms_norm(x, weight, eps)


def fused_rms_norm_to(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """float32 x (..., D) and weight (D,) on a CPU -> y (..., D) in `dtype` (bf16 or fp16): the value
    `fused_rms_norm(x, weight, eps).to(dtype)` has, written once. Under autocast the product after a
    norm casts its input to that dtype anyway; writing it straight saves the float32 y and the cast
    pass forward, and the cast of the gradient back to float32 in backward (the kernel reads a bf16
    gradient as it is). The gradients are the same bits."""
    load()
    return torch.ops.minimind.fused_rms_norm_forward_to(x, weight, eps, dtype)[0]


# ---------------------------------------------------------------------------------------------
# The fused splice: each output row written once (kernels/splice.cpp, CPU)
# ---------------------------------------------------------------------------------------------
# `minimind_v.splice.splice` copies all of h and then writes the image rows over that copy; the
# kernel writes every row once, from h or from an image, so it moves the bytes of one copy of h.
# Finding the runs is one scan per row in C++ too (`minimind::image_starts`, the same starts as
# `minimind_v.splice.image_starts`): on small batches the ~20 small torch ops of the vectorized
# search would cost more than moving the rows.
def fused_splice(input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor,
                 image_ids) -> torch.Tensor:
    """`minimind_v.splice.splice` with the row moves done by the kernel: same arguments, same result.

    input_ids (B, T), h (B, T, D), image_embeds (B, N, L, D), image_ids: list of L ids -> (B, T, D).
    The kernel is CPU only; for tensors on another device this is `splice` itself.
    """
    if h.device.type != "cpu":
        return splice(input_ids, h, image_embeds, image_ids)
    load()
    L = check_splice_args(input_ids, h, image_embeds, image_ids)
    T, N = h.shape[1], image_embeds.shape[1]
    if T < L or N == 0:                                 # shapes alone say nothing is replaced
        return h.clone()
    pattern = torch.tensor(image_ids, dtype=torch.long)                         # (L,)
    starts = torch.ops.minimind.image_starts(input_ids, pattern, N)             # (B, N), one scan in C++
    return torch.ops.minimind.splice_rows(h, image_embeds.to(h.dtype), starts)  # (B, T, D)
