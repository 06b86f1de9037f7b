"""Building the hand-written kernels in `kernels/` into this process, once, on first use.

Where it sits: under `ops.py`. The first call of a fused op (`ops.fused_rms_norm`,
`ops.fused_splice`) calls `load()`, which compiles `kernels/rmsnorm.cpp` and `kernels/splice.cpp`
(and `kernels/rmsnorm.cu` when a CUDA torch and nvcc are present) with
`torch.utils.cpp_extension` into a cache folder keyed by a hash of the sources, the flags and the
torch version, and loads the shared library. Loading runs the C++ `TORCH_LIBRARY` blocks, which
define the `minimind::` ops and their CPU/CUDA kernels. A later process finds the folder and
only loads it (a second or so); a changed source or flag gets a new folder.

Nothing here runs at import: `import minimind_v.ops` compiles nothing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.utils.cpp_extension


KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
CPP_SOURCE = KERNELS_DIR / "rmsnorm.cpp"
CUDA_SOURCE = KERNELS_DIR / "rmsnorm.cu"
SPLICE_SOURCE = KERNELS_DIR / "splice.cpp"        # the fused splice (CPU only)


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
            "minimind_v.kernel_build: cannot build the fused RMSNorm kernels from "
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
            warnings.warn(f"minimind_v.kernel_build: the CUDA kernels did not build ({e}); using the CPU kernels only")
    return _build(with_cuda=False, verbose=verbose)


def _build(with_cuda: bool, verbose: bool) -> Path:
    """The folder name is a hash of everything that changes the binary."""
    cpp_ext = torch.utils.cpp_extension
    sources = [CPP_SOURCE, SPLICE_SOURCE] + ([CUDA_SOURCE] if with_cuda else [])
    for src in sources:
        if not src.is_file():
            raise RuntimeError(f"minimind_v.kernel_build: kernel source {src} is missing "
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
    name = "minimind_rmsnorm_cuda" if with_cuda else "minimind_rmsnorm"
    if not (build_dir / f"{name}.so").exists():       # a first build takes a while: say what it is
        print(f"minimind_v: compiling the kernels in {KERNELS_DIR} into {build_dir} "
              "(once per machine and torch version)", file=sys.stderr, flush=True)
    cpp_ext.load(
        name=name,
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


_lock = threading.Lock()
BUILD_DIR: Path | None = None      # set by the first successful load()


def load(verbose: bool = False) -> Path:
    """Build (or reuse) and load the kernels once per process; returns the build folder."""
    global BUILD_DIR
    with _lock:
        if BUILD_DIR is None:
            BUILD_DIR = build(verbose=verbose)
    return BUILD_DIR
