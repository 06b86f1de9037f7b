"""The fused RMSNorm custom op (its math in torch ops, its build, its registration), and the
fused splice built with it.

Eager `rms_norm` (minimind_v.norm) is five or six kernels forward (square, mean, rsqrt, two
multiplies), each a full pass over memory, and autograd keeps their intermediates for backward.
The op here does one pass per row forward and one pass per row backward, and saves only the
per-row reciprocal RMS `rstd` (one number per row). Where it sits: `RMSNorm(impl="fused")`.

    forward    r = 1 / sqrt(mean(x^2) + eps)            (one per row)
               y = w * cast_x(x * r)                      (cast_x: round to x's dtype, as eager does)
    backward   dx = r * (g*w - x * r^2 * mean(g*w*x))
               dw = sum over rows of g * cast_x(x * r)

This module has four parts:
1. `rms_norm_forward`, `rms_norm_backward`, `RMSNormFunction`: the same math in plain torch ops,
   with the backward derived by hand (lesson 11). They need no compiler.
2. The build: `kernels/rmsnorm.cpp` and `kernels/splice.cpp` (and `kernels/rmsnorm.cu` when a
   CUDA torch and nvcc are present) are compiled once with `torch.utils.cpp_extension` into a cache
   folder keyed by a hash of the sources, flags and torch version, then loaded. Loading runs the C++ `TORCH_LIBRARY`
   block, which defines `minimind::fused_rms_norm_forward` and `minimind::fused_rms_norm_backward`.
3. The registration: fake (meta) kernels so `torch.compile` and `opcheck` can trace shapes without
   running C++, the autograd formula (forward saves x, w, rstd; backward calls the backward op), and
   the public `minimind::fused_rms_norm(x, weight, eps) -> y`, a composite of the forward op.
4. The fused splice (`kernels/splice.cpp`, compiled into the same library): `fused_splice`, the
   result of `minimind_v.splice.splice` with every output row written once (lesson 08).

Importing this module builds (or loads from the cache) the kernels, so after `import minimind_v.ops`
`torch.ops.minimind.fused_rms_norm(x, weight, eps)` exists. Dtypes: y has promote(x, w)'s dtype
(bf16 x with a float32 weight, as under autocast, gives float32, exactly like eager `rms_norm`);
statistics are float32 (float64 for float64 x).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.utils.cpp_extension

from .splice import _check, splice

# ---------------------------------------------------------------------------------------------
# 1. The math in torch ops (the hand-written backward that the kernels implement)
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)   # float32, or float64 for float64


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """x (..., D), weight (D,) -> y (..., D) in promote(x, w) dtype, rstd (...) float32/float64."""
    xf = x.to(_acc_dtype(x.dtype))                                   # (..., D)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)                  # (...,)
    y = weight * (xf * rstd.unsqueeze(-1)).to(x.dtype)                # (..., D)
    return y, rstd


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Gradients of y = w * x * r by hand: grad_y (..., D), x (..., D), weight (D,), rstd (...).

    With n = x * r and dn = g * w:  dx = r * (dn - n * mean(dn * n)),  dw = sum_rows(g * n).
    Returns dx (..., D) in x's dtype and dw (D,) in weight's dtype.
    """
    acc = _acc_dtype(x.dtype)
    xf, g, w = x.to(acc), grad_y.to(acc), weight.to(acc)
    r = rstd.to(acc).unsqueeze(-1)                                    # (..., 1)
    dn = g * w                                                        # (..., D)
    n = xf * r                                                        # (..., D)
    dx = r * (dn - n * (dn * n).mean(dim=-1, keepdim=True))           # (..., D)
    dw = (g * n.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0)  # (D,)
    return dx.to(x.dtype), dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with the hand-written backward; saves x, w and rstd only.  apply(x, weight, eps)."""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(grad_y, x, weight, rstd)
        return dx, dw, None


# ---------------------------------------------------------------------------------------------
# 2. The build
# ---------------------------------------------------------------------------------------------

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
CPP_SOURCE = KERNELS_DIR / "rmsnorm.cpp"
CUDA_SOURCE = KERNELS_DIR / "rmsnorm.cu"
SPLICE_SOURCE = KERNELS_DIR / "splice.cpp"        # the fused splice (CPU only), section 4


def _cpu_flags() -> list[str]:
    """-O3 and OpenMP (at::parallel_for is OpenMP inside), plus AVX2 when torch itself runs AVX2+.

    The AVX2 choice follows what torch detected on this machine and is part of the cache key, so a
    build is never reused on a CPU that cannot run it.
    """
    flags = ["-O3", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def _want_cuda() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None and _nvcc() is not None


def _nvcc() -> str | None:
    cuda_home = torch.utils.cpp_extension.CUDA_HOME
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cache_root() -> Path:
    if os.environ.get("MINIMIND_V_KERNEL_CACHE"):
        return Path(os.environ["MINIMIND_V_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minimind_v" / "kernels"


def _check_toolchain(with_cuda: bool) -> None:
    compiler = os.environ.get("CXX", "c++")
    missing = []
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ('{compiler}' is not on PATH; install g++ or clang, or set CXX)")
    if not torch.utils.cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if with_cuda and _nvcc() is None:
        missing.append("nvcc (set CUDA_HOME to your CUDA toolkit)")
    if missing:
        raise RuntimeError(
            "minimind_v.ops: cannot build the fused RMSNorm kernels from "
            f"{CPP_SOURCE}: missing " + "; ".join(missing) +
            ". Use RMSNorm(impl='eager') / LMConfig(norm_impl='eager') instead.")


def build(verbose: bool = False) -> Path:
    """Compile (or reuse from the cache) the kernels and load them into this process.

    Returns the build folder. With a CUDA torch and nvcc the CUDA kernels are built too; if that
    build fails, a warning says why and the CPU kernels are built alone, so the op stays usable.
    Set MINIMIND_V_KERNELS_CPU_ONLY=1 to skip the CUDA build.
    """
    if _want_cuda() and os.environ.get("MINIMIND_V_KERNELS_CPU_ONLY", "0") != "1":
        try:
            return _build(with_cuda=True, verbose=verbose)
        except (RuntimeError, OSError) as e:   # compile or dlopen failed: nothing was registered
            warnings.warn(f"minimind_v.ops: the CUDA kernels did not build ({e}); using the CPU kernels only")
    return _build(with_cuda=False, verbose=verbose)


def _build(with_cuda: bool, verbose: bool) -> Path:
    """The folder name is a hash of everything that changes the binary."""
    cpp_ext = torch.utils.cpp_extension
    sources = [CPP_SOURCE, SPLICE_SOURCE] + ([CUDA_SOURCE] if with_cuda else [])
    for src in sources:
        if not src.is_file():
            raise RuntimeError(f"minimind_v.ops: kernel source {src} is missing "
                               "(the package must be installed from a source checkout: pip install -e .)")
    _check_toolchain(with_cuda)
    cflags = _cpu_flags()
    cuda_flags = ["-O3"] if with_cuda else []
    key = hashlib.sha256()
    for src in sources:
        key.update(src.read_bytes())
    key.update(repr((torch.__version__, torch.version.cuda, sys.version_info[:2], cflags, cuda_flags)).encode())
    build_dir = _cache_root() / key.hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_ext.load(
        name="minimind_rmsnorm_cuda" if with_cuda else "minimind_rmsnorm",
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,   # a plain shared library: loading it registers the ops
        verbose=verbose,
    )
    return build_dir


BUILD_DIR = build()

# ---------------------------------------------------------------------------------------------
# 3. Registration: fake kernels, autograd, the public op
# ---------------------------------------------------------------------------------------------


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

# The public op: y only. It is a composite of the forward op, so autograd, fake tensors and
# torch.compile all go through the forward op's registrations above.
_lib = torch.library.Library("minimind", "FRAGMENT")
_lib.define("fused_rms_norm(Tensor x, Tensor weight, float eps=1e-05) -> Tensor")


def _fused_rms_norm_composite(x, weight, eps=1e-5):
    return torch.ops.minimind.fused_rms_norm_forward(x, weight, eps)[0]


_lib.impl("fused_rms_norm", _fused_rms_norm_composite, "CompositeImplicitAutograd")


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D): the fused kernel, same result as `norm.rms_norm`."""
    return torch.ops.minimind.fused_rms_norm(x, weight, eps)


# ---------------------------------------------------------------------------------------------
# 4. The fused splice: each output row written once (kernels/splice.cpp, CPU)
# ---------------------------------------------------------------------------------------------
# `minimind_v.splice.splice` copies all of h and then writes the image rows over that copy; the
# kernel writes every row once, from h or from an image, so it moves the bytes of one copy of h.
# Finding the runs is one scan per row in C++ too (`minimind::image_starts`, the same starts as
# `minimind_v.splice.image_starts`): on small batches the ~20 small torch ops of the vectorized
# search would cost more than moving the rows.


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


def fused_splice(input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor,
                 image_ids) -> torch.Tensor:
    """`minimind_v.splice.splice` with the row moves done by the kernel: same arguments, same result.

    input_ids (B, T), h (B, T, D), image_embeds (B, N, L, D), image_ids: list of L ids -> (B, T, D).
    The kernel is CPU only; for tensors on another device this is `splice` itself.
    """
    if h.device.type != "cpu":
        return splice(input_ids, h, image_embeds, image_ids)
    L = _check(input_ids, h, image_embeds, image_ids)
    T, N = h.shape[1], image_embeds.shape[1]
    if T < L or N == 0:                                 # shapes alone say nothing is replaced
        return h.clone()
    pattern = torch.tensor(image_ids, dtype=torch.long)                         # (L,)
    starts = torch.ops.minimind.image_starts(input_ids, pattern, N)             # (B, N), one scan in C++
    return torch.ops.minimind.splice_rows(h, image_embeds.to(h.dtype), starts)  # (B, T, D)
