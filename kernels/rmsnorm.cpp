// Fused RMSNorm for the CPU: one pass over memory forward, one pass backward.
//
//   forward    y = w * cast_x(x * r),          r = 1 / sqrt(mean(x^2) + eps)   (one r per row)
//   backward   dx = r * (g*w - x * r^2 * mean(g*w*x))
//              dw = sum over rows of g * cast_x(x * r)
//
// `cast_x` rounds to x's dtype, exactly as the eager `minimind_v.norm.rms_norm` does before the
// weight multiply. The output dtype is promote(x.dtype, w.dtype): bf16 x with fp32 w (autocast)
// gives fp32, like eager. Statistics and sums are accumulated in float32 (float64 for float64).
// Forward saves only r (one number per row) for the backward; y is never stored for it.
//
// Parallelism: rows are independent, so `at::parallel_for` splits them across threads.
// dw is a sum over rows; to keep it deterministic the rows are cut into a fixed number of blocks
// (independent of the thread count), each block sums its rows into its own partial vector, and the
// partials are added in block order.
//
// The schemas are defined here (TORCH_LIBRARY); the Python side (minimind_v/ops.py) adds the fake
// (meta) kernels, the autograd formula and the public `minimind::fused_rms_norm`.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace minimind {

// ---- checks and dtype plumbing --------------------------------------------------------------

// Shared with rmsnorm.cu. The output dtype is promote(x, w); supported: w == x, or float32 w with a bf16/fp16 x.
at::ScalarType check_and_out_dtype(const at::Tensor& x, const at::Tensor& weight, const char* who) {
  TORCH_CHECK(x.dim() >= 1, who, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 1, who, ": weight must be 1-D (D,), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) == x.size(-1), who, ": weight has ", weight.size(0),
              " elements but x's last dimension is ", x.size(-1));
  TORCH_CHECK(x.device() == weight.device(), who, ": x is on ", x.device(), " but weight is on ",
              weight.device());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf, who,
              ": x must be float32, float64, bfloat16 or float16, got ", xt);
  const auto out = c10::promoteTypes(xt, weight.scalar_type());
  const bool half_x = xt == at::kBFloat16 || xt == at::kHalf;
  TORCH_CHECK(out == xt || (half_x && out == at::kFloat), who, ": unsupported dtype pair x=", xt,
              ", weight=", weight.scalar_type(), " (the result would be ", out,
              "); use a weight of x's dtype or float32");
  return out;
}

namespace {

using at::vec::Vectorized;

constexpr int64_t kGrainElements = 32768;  // at least this many elements per parallel task
constexpr int64_t kMaxDwBlocks = 64;       // fixed row blocks for the deterministic dw sum

// ---- small vectorised helpers (acc_t is float or double) ------------------------------------

// sum(a * b * c) (c may be null: sum(a * b)) with two vector accumulators; the order of the
// additions is fixed, so the result is deterministic.
template <typename acc_t>
acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, const acc_t* __restrict c, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  auto ab = [&](int64_t i) {
    return c ? Vec::loadu(a + i) * Vec::loadu(c + i) : Vec::loadu(a + i);
  };
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    s0 = at::vec::fmadd(ab(i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(ab(i + V), Vec::loadu(b + i + V), s1);
  }
  for (; i + V <= n; i += V) s0 = at::vec::fmadd(ab(i), Vec::loadu(b + i), s0);
  acc_t lanes[V];
  (s0 + s1).store(lanes);
  acc_t s = 0;
  for (int64_t k = 0; k < V; ++k) s += lanes[k];
  for (; i < n; ++i) s += (c ? a[i] * c[i] : a[i]) * b[i];
  return s;
}

// Widen a row of T into the accumulation type (bf16/fp16 -> float with vector conversions).
template <typename T, typename acc_t>
void widen(const T* __restrict src, acc_t* __restrict dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    using bVec = Vectorized<T>;
    constexpr int64_t fV = Vectorized<float>::size();
    for (; i + bVec::size() <= n; i += bVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(bVec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + fV);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// Narrow a row of acc_t to T (round to nearest even).
template <typename T, typename acc_t>
void narrow(const acc_t* __restrict src, T* __restrict dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    using bVec = Vectorized<T>;
    using fVec = Vectorized<float>;
    constexpr int64_t fV = fVec::size();
    for (; i + bVec::size() <= n; i += bVec::size()) {
      bVec v = at::vec::convert_from_float<T>(fVec::loadu(src + i), fVec::loadu(src + i + fV));
      v.store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Round a row in place to T's precision (a no-op when T is the accumulation type).
template <typename T, typename acc_t>
void round_to(acc_t* __restrict row, T* __restrict scratch, int64_t n) {
  if constexpr (!std::is_same_v<T, acc_t>) {
    narrow<T, acc_t>(row, scratch, n);
    widen<T, acc_t>(scratch, row, n);
  }
}

// A row pointer in the accumulation type: the tensor itself when no conversion is needed,
// otherwise the row widened into `buf`.
template <typename T, typename acc_t>
const acc_t* as_acc(const T* row, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return row;
  } else {
    widen<T, acc_t>(row, buf, n);
    return buf;
  }
}

// ---- forward ------------------------------------------------------------------------------

// x_t: dtype of x; out_t: dtype of w and y (x_t, or float when x is bf16/fp16).
// Per row: one read of x from memory (the second read hits the cache), one write of y.
template <typename x_t, typename out_t>
void forward_kernel(const x_t* x, const at::opmath_type<x_t>* w, out_t* y, at::opmath_type<x_t>* rstd,
                    int64_t N, int64_t D, double eps) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / D);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(D), nbuf(D), ybuf(D);
    std::vector<x_t> scratch(D);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* xi = as_acc<x_t, acc_t>(x + i * D, xbuf.data(), D);      // (D,)
      const acc_t r = acc_t(1) / std::sqrt(dot<acc_t>(xi, xi, nullptr, D) / acc_t(D) + acc_t(eps));
      rstd[i] = r;
      acc_t* yi = ybuf.data();                                               // (D,) y in acc_t
      if constexpr (std::is_same_v<out_t, acc_t>) yi = y + i * D;            // ... or y itself
      if constexpr (std::is_same_v<x_t, acc_t>) {
        for (int64_t j = 0; j < D; ++j) yi[j] = (xi[j] * r) * w[j];
      } else {
        acc_t* n = nbuf.data();
        for (int64_t j = 0; j < D; ++j) n[j] = xi[j] * r;                   // normalised row
        round_to<x_t, acc_t>(n, scratch.data(), D);                          // cast to x's dtype
        for (int64_t j = 0; j < D; ++j) yi[j] = n[j] * w[j];
      }
      if constexpr (!std::is_same_v<out_t, acc_t>) narrow<out_t, acc_t>(yi, y + i * D, D);
    }
  });
}

// ---- backward -----------------------------------------------------------------------------

// Per row: one read of grad_y and x from memory, one write of dx; dw accumulates in the cache.
template <typename x_t, typename out_t>
void backward_kernel(const out_t* g, const x_t* x, const at::opmath_type<x_t>* w,
                     const at::opmath_type<x_t>* rstd, x_t* dx, at::opmath_type<x_t>* dw_partial,
                     int64_t num_blocks, int64_t N, int64_t D) {
  using acc_t = at::opmath_type<x_t>;
  const acc_t inv_D = acc_t(1) / acc_t(D);
  const int64_t rows_per_task = std::max<int64_t>(1, kGrainElements / D);
  const int64_t grain = std::max<int64_t>(1, rows_per_task * num_blocks / N);
  at::parallel_for(0, num_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> xbuf(D), gbuf(D), dxbuf(D), nbuf(D);
    std::vector<x_t> scratch(D);
    for (int64_t b = b_begin; b < b_end; ++b) {
      acc_t* dw_b = dw_partial + b * D;                                      // (D,) this block's part
      const int64_t row_begin = N * b / num_blocks, row_end = N * (b + 1) / num_blocks;
      for (int64_t i = row_begin; i < row_end; ++i) {
        const acc_t* xi = as_acc<x_t, acc_t>(x + i * D, xbuf.data(), D);     // (D,)
        const acc_t* gi = as_acc<out_t, acc_t>(g + i * D, gbuf.data(), D);   // (D,)
        const acc_t r = rstd[i];
        // dx = r * g*w - x * (r^3 * mean(g*w*x))
        const acc_t c = r * r * r * dot<acc_t>(gi, xi, w, D) * inv_D;
        if constexpr (std::is_same_v<x_t, acc_t>) {
          x_t* dxi = dx + i * D;
          for (int64_t j = 0; j < D; ++j) {
            dxi[j] = r * (gi[j] * w[j]) - c * xi[j];
            dw_b[j] += gi[j] * (xi[j] * r);                                  // dw += g * (x * r)
          }
        } else {
          acc_t* t = dxbuf.data();
          for (int64_t j = 0; j < D; ++j) t[j] = r * (gi[j] * w[j]) - c * xi[j];
          narrow<x_t, acc_t>(t, dx + i * D, D);
          acc_t* n = nbuf.data();
          for (int64_t j = 0; j < D; ++j) n[j] = xi[j] * r;
          round_to<x_t, acc_t>(n, scratch.data(), D);                       // cast to x's dtype
          for (int64_t j = 0; j < D; ++j) dw_b[j] += gi[j] * n[j];           // dw += g * cast_x(x * r)
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_rms_norm_forward_cpu(const at::Tensor& x_in,
                                                              const at::Tensor& weight, double eps) {
  const auto out_dtype = check_and_out_dtype(x_in, weight, "fused_rms_norm_forward");
  const at::Tensor x = x_in.contiguous();
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : x.numel() / D;
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  auto rstd_shape = x.sizes().vec();
  rstd_shape.pop_back();
  at::Tensor rstd = at::empty(rstd_shape, x.options().dtype(acc_dtype));
  if (N == 0 || D == 0) return {y, rstd};
  const at::Tensor w = weight.to(acc_dtype).contiguous();  // (D,) in the accumulation type
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_rms_norm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == x.scalar_type()) {
      forward_kernel<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                         y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), N, D, eps);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      forward_kernel<scalar_t, float>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                      y.data_ptr<float>(), rstd.data_ptr<acc_t>(), N, D, eps);
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> fused_rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                               const at::Tensor& x_in,
                                                               const at::Tensor& weight,
                                                               const at::Tensor& rstd_in) {
  const auto out_dtype = check_and_out_dtype(x_in, weight, "fused_rms_norm_backward");
  const auto acc_dtype = at::toOpMathType(x_in.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "fused_rms_norm_backward: grad_y has shape ",
              grad_y.sizes(), " but x has shape ", x_in.sizes());
  TORCH_CHECK(rstd_in.numel() * x_in.size(-1) == x_in.numel(),
              "fused_rms_norm_backward: rstd must hold one value per row of x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_y.to(out_dtype).contiguous();
  const at::Tensor rstd = rstd_in.to(acc_dtype).contiguous();
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : x.numel() / D;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (N == 0 || D == 0) {
    return {dx, at::zeros(weight.sizes(), weight.options())};
  }
  const at::Tensor w = weight.to(acc_dtype).contiguous();
  const int64_t num_blocks = std::min(N, kMaxDwBlocks);
  at::Tensor dw_partial = at::zeros({num_blocks, D}, x.options().dtype(acc_dtype));  // (blocks, D)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_rms_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == x.scalar_type()) {
      backward_kernel<scalar_t, scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                          w.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
                                          dx.data_ptr<scalar_t>(), dw_partial.data_ptr<acc_t>(),
                                          num_blocks, N, D);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      backward_kernel<scalar_t, float>(g.const_data_ptr<float>(), x.const_data_ptr<scalar_t>(),
                                       w.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
                                       dx.data_ptr<scalar_t>(), dw_partial.data_ptr<acc_t>(),
                                       num_blocks, N, D);
    }
  });
  // Add the block partials in block order, columns in parallel: the same bits on every run.
  at::Tensor dw = at::empty({D}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "fused_rms_norm_dw", [&] {
    const scalar_t* part = dw_partial.const_data_ptr<scalar_t>();
    scalar_t* out = dw.data_ptr<scalar_t>();
    at::parallel_for(0, D, std::max<int64_t>(1, kGrainElements / num_blocks), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) out[j] = 0;
      for (int64_t b = 0; b < num_blocks; ++b) {
        const scalar_t* pb = part + b * D;
        for (int64_t j = j0; j < j1; ++j) out[j] += pb[j];
      }
    });
  });
  return {dx, dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(minimind, m) {
  // y (..., D) in promote(x, w) dtype; rstd (...) = 1 / sqrt(mean(x^2) + eps), float32 (float64 for float64 x)
  m.def("fused_rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // dx (..., D) in x's dtype, dw (D,) in weight's dtype
  m.def("fused_rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minimind, CPU, m) {
  m.impl("fused_rms_norm_forward", &fused_rms_norm_forward_cpu);
  m.impl("fused_rms_norm_backward", &fused_rms_norm_backward_cpu);
}

}  // namespace minimind
