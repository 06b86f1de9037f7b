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
#include <utility>

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

// ---- vector helpers ---------------------------------------------------------------------------
//
// A row is processed in chunks of C = 2 * Vec::size() elements (16 floats with AVX2), held as two
// vectors of the accumulation type acc_t (float, or double for double): bf16/fp16 are widened on
// load and narrowed on store, so every dtype shares one loop body.

template <typename acc_t>
using Vec = Vectorized<acc_t>;
template <typename acc_t>
using Vec2 = std::pair<Vec<acc_t>, Vec<acc_t>>;

template <typename T>
constexpr bool is_reduced = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

template <typename T, typename acc_t>
inline Vec2<acc_t> load2(const T* p) {
  if constexpr (is_reduced<T>) {
    static_assert(Vectorized<T>::size() == 2 * Vec<float>::size());
    auto [lo, hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    return {lo, hi};
  } else {
    return {Vec<acc_t>::loadu(p), Vec<acc_t>::loadu(p + Vec<acc_t>::size())};
  }
}

template <typename T, typename acc_t>
inline void store2(T* p, const Vec<acc_t>& lo, const Vec<acc_t>& hi) {
  if constexpr (is_reduced<T>) {
    at::vec::convert_from_float<T>(lo, hi).store(p);   // round to nearest even
  } else {
    lo.store(p);
    hi.store(p + Vec<acc_t>::size());
  }
}

// Round to T's precision and back (cast_x); a no-op when T is the accumulation type.
template <typename T, typename acc_t>
inline Vec2<acc_t> round2(const Vec<acc_t>& lo, const Vec<acc_t>& hi) {
  if constexpr (is_reduced<T>) {
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(lo, hi));
    return {a, b};
  } else {
    return {lo, hi};
  }
}

template <typename acc_t>
inline acc_t horizontal_sum(const Vec<acc_t>& v) {
  acc_t lanes[Vec<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t k = 0; k < Vec<acc_t>::size(); ++k) s += lanes[k];
  return s;
}

// ---- forward ------------------------------------------------------------------------------

// One row: x (D,) -> y (D,), returns r. x_t: dtype of x; out_t: dtype of y (x_t, or float when x
// is bf16/fp16); w is in acc_t. x is read from memory once; the second loop finds it in L1/L2.
template <typename x_t, typename out_t, typename acc_t = at::opmath_type<x_t>>
acc_t forward_row(const x_t* __restrict x, const acc_t* __restrict w, out_t* __restrict y, int64_t D,
                  acc_t eps) {
  constexpr int64_t V = Vec<acc_t>::size(), C = 2 * V;
  Vec<acc_t> s0(acc_t(0)), s1(acc_t(0));
  int64_t j = 0;
  for (; j + C <= D; j += C) {                        // sum of squares, two accumulators
    auto [a, b] = load2<x_t, acc_t>(x + j);
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  acc_t sumsq = horizontal_sum<acc_t>(s0 + s1);
  for (; j < D; ++j) sumsq += static_cast<acc_t>(x[j]) * static_cast<acc_t>(x[j]);
  const acc_t r = acc_t(1) / std::sqrt(sumsq / static_cast<acc_t>(D) + eps);

  const Vec<acc_t> rv(r);
  for (j = 0; j + C <= D; j += C) {                   // y = w * cast_x(x * r)
    auto [a, b] = load2<x_t, acc_t>(x + j);
    auto [na, nb] = round2<x_t, acc_t>(a * rv, b * rv);
    store2<out_t, acc_t>(y + j, na * Vec<acc_t>::loadu(w + j), nb * Vec<acc_t>::loadu(w + j + V));
  }
  for (; j < D; ++j) {
    const acc_t n = static_cast<acc_t>(static_cast<x_t>(static_cast<acc_t>(x[j]) * r));
    y[j] = static_cast<out_t>(n * w[j]);
  }
  return r;
}

template <typename x_t, typename out_t>
void forward_kernel(const x_t* x, const at::opmath_type<x_t>* w, out_t* y, at::opmath_type<x_t>* rstd,
                    int64_t N, int64_t D, double eps) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / D);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      rstd[i] = forward_row<x_t, out_t>(x + i * D, w, y + i * D, D, static_cast<acc_t>(eps));
  });
}

// ---- backward -----------------------------------------------------------------------------

// One row: dx = r * (g*w) - x * c  with  c = r^3 * mean(g*w*x);  dw_acc += g * cast_x(x * r).
// g and x are read from memory once (the second loop finds them in cache), dx written once.
template <typename x_t, typename out_t, typename acc_t = at::opmath_type<x_t>>
void backward_row(const out_t* __restrict g, const x_t* __restrict x, const acc_t* __restrict w, acc_t r,
                  x_t* __restrict dx, acc_t* __restrict dw_acc, int64_t D) {
  constexpr int64_t V = Vec<acc_t>::size(), C = 2 * V;
  Vec<acc_t> s0(acc_t(0)), s1(acc_t(0));
  int64_t j = 0;
  for (; j + C <= D; j += C) {                        // sum of g * w * x
    auto [ga, gb] = load2<out_t, acc_t>(g + j);
    auto [xa, xb] = load2<x_t, acc_t>(x + j);
    s0 = at::vec::fmadd(ga * Vec<acc_t>::loadu(w + j), xa, s0);
    s1 = at::vec::fmadd(gb * Vec<acc_t>::loadu(w + j + V), xb, s1);
  }
  acc_t dot = horizontal_sum<acc_t>(s0 + s1);
  for (; j < D; ++j) dot += static_cast<acc_t>(g[j]) * w[j] * static_cast<acc_t>(x[j]);
  const acc_t c = r * r * r * dot / static_cast<acc_t>(D);

  const Vec<acc_t> rv(r), cv(c);
  for (j = 0; j + C <= D; j += C) {
    auto [ga, gb] = load2<out_t, acc_t>(g + j);
    auto [xa, xb] = load2<x_t, acc_t>(x + j);
    const Vec<acc_t> wa = Vec<acc_t>::loadu(w + j), wb = Vec<acc_t>::loadu(w + j + V);
    store2<x_t, acc_t>(dx + j, rv * (ga * wa) - cv * xa, rv * (gb * wb) - cv * xb);
    auto [na, nb] = round2<x_t, acc_t>(xa * rv, xb * rv);
    at::vec::fmadd(ga, na, Vec<acc_t>::loadu(dw_acc + j)).store(dw_acc + j);
    at::vec::fmadd(gb, nb, Vec<acc_t>::loadu(dw_acc + j + V)).store(dw_acc + j + V);
  }
  for (; j < D; ++j) {
    const acc_t gj = static_cast<acc_t>(g[j]), xj = static_cast<acc_t>(x[j]);
    dx[j] = static_cast<x_t>(r * (gj * w[j]) - c * xj);
    dw_acc[j] += gj * static_cast<acc_t>(static_cast<x_t>(xj * r));
  }
}

template <typename x_t, typename out_t>
void backward_kernel(const out_t* g, const x_t* x, const at::opmath_type<x_t>* w,
                     const at::opmath_type<x_t>* rstd, x_t* dx, at::opmath_type<x_t>* dw_partial,
                     int64_t num_blocks, int64_t N, int64_t D) {
  const int64_t rows_per_task = std::max<int64_t>(1, kGrainElements / D);
  const int64_t grain = std::max<int64_t>(1, rows_per_task * num_blocks / N);
  at::parallel_for(0, num_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {      // block b: a fixed range of rows
      const int64_t row_begin = N * b / num_blocks, row_end = N * (b + 1) / num_blocks;
      for (int64_t i = row_begin; i < row_end; ++i)
        backward_row<x_t, out_t>(g + i * D, x + i * D, w, rstd[i], dx + i * D, dw_partial + b * D, D);
    }
  });
}

// y in out_dtype: x's dtype; float32 for a bf16/fp16 x (promote with a float32 w); or, for a float32
// x, bf16/fp16 (`fused_rms_norm_forward_to`). The caller has checked the dtypes.
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x_in, const at::Tensor& weight, double eps,
                                                at::ScalarType out_dtype) {
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
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    if (out_dtype == x.scalar_type()) {
      forward_kernel<scalar_t, scalar_t>(xp, wp, y.data_ptr<scalar_t>(), rp, N, D, eps);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {              // bf16/fp16 x -> float32 y
      forward_kernel<scalar_t, float>(xp, wp, y.data_ptr<float>(), rp, N, D, eps);
    } else {                                                               // float32 x -> bf16/fp16 y
      const float* xf = x.const_data_ptr<float>();
      const float* wf = w.const_data_ptr<float>();
      float* rf = rstd.data_ptr<float>();
      if (out_dtype == at::kBFloat16) {
        forward_kernel<float, at::BFloat16>(xf, wf, y.data_ptr<at::BFloat16>(), rf, N, D, eps);
      } else {
        forward_kernel<float, at::Half>(xf, wf, y.data_ptr<at::Half>(), rf, N, D, eps);
      }
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> fused_rms_norm_forward_cpu(const at::Tensor& x_in,
                                                              const at::Tensor& weight, double eps) {
  return forward_impl(x_in, weight, eps, check_and_out_dtype(x_in, weight, "fused_rms_norm_forward"));
}

// Under autocast: float32 x and w, y written straight in autocast's dtype (bf16/fp16), the value
// the next product's cast would make of the float32 y, without the float32 y and the cast pass.
std::tuple<at::Tensor, at::Tensor> fused_rms_norm_forward_to_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                 double eps, at::ScalarType dtype) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "fused_rms_norm_forward_to: x and weight must be float32, got ", x_in.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_rms_norm_forward_to: dtype must be bfloat16 or float16, got ", dtype);
  check_and_out_dtype(x_in, weight, "fused_rms_norm_forward_to");
  return forward_impl(x_in, weight, eps, dtype);
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
  // a bf16/fp16 grad_y of float32 x (from fused_rms_norm_forward_to) is read as it is, widened on load
  const auto gt = grad_y.scalar_type();
  const bool reduced_g = x.scalar_type() == at::kFloat && (gt == at::kBFloat16 || gt == at::kHalf);
  const at::Tensor g = (reduced_g ? grad_y : grad_y.to(out_dtype)).contiguous();
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
  if (reduced_g) {
    auto run = [&](auto* g_ptr) {
      backward_kernel<float>(g_ptr, x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                             rstd.const_data_ptr<float>(), dx.data_ptr<float>(), dw_partial.data_ptr<float>(),
                             num_blocks, N, D);
    };
    if (gt == at::kBFloat16) run(g.const_data_ptr<at::BFloat16>()); else run(g.const_data_ptr<at::Half>());
  } else {
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
  }
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
  // the same for float32 x and w with y in `dtype` (bf16/fp16: autocast's), CPU only
  m.def("fused_rms_norm_forward_to(Tensor x, Tensor weight, float eps, ScalarType dtype) -> (Tensor, Tensor)");
  // dx (..., D) in x's dtype, dw (D,) in weight's dtype
  m.def("fused_rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minimind, CPU, m) {
  m.impl("fused_rms_norm_forward", &fused_rms_norm_forward_cpu);
  m.impl("fused_rms_norm_forward_to", &fused_rms_norm_forward_to_cpu);
  m.impl("fused_rms_norm_backward", &fused_rms_norm_backward_cpu);
}

}  // namespace minimind
