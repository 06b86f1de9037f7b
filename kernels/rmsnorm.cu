// Fused RMSNorm for CUDA GPUs: the same math and dtype rules as rmsnorm.cpp (read that first).
//
//   forward    one thread block per row: each thread loads packs of 16 bytes of x (4 floats, 8
//              bf16/fp16), squares and sums them, the block reduces the sum (warp shuffles, then one
//              warp over the warp partials), and the threads write y = w * cast_x(x * r).
//   backward   dx: one block per row, the same pattern with the reduction mean(g*w*x).
//              dw: a column reduction, deterministic in two steps: blocks of (32 columns x 16 row
//              lanes) sum a fixed group of rows each into partial[group, :], then a second kernel
//              adds the groups in order. It reads x and g a second time (simple; a fused dx+dw
//              kernel would save that traffic).
//
// Every reduction has a fixed order (no atomics), so results are the same from run to run.
// Built only when torch has CUDA and nvcc is found (minimind_v/ops.py).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace minimind {

// defined in rmsnorm.cpp: validates shapes/devices/dtypes, returns promote(x, w)
at::ScalarType check_and_out_dtype(const at::Tensor& x, const at::Tensor& weight, const char* who);

namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;     // threads per row block
constexpr int kDwRowLanes = 16;      // blockDim.y of the dw kernel
constexpr int64_t kDwRowsPerGroup = 64;
constexpr int64_t kDwMaxGroups = 256;

// VEC elements loaded or stored as one aligned access (16 bytes for VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, returned to every thread; `shared` holds kWarp values.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T s = lane < num_warps ? shared[lane] : T(0);
    s = warp_sum(s);
    if (lane == 0) shared[0] = s;
  }
  __syncthreads();
  const T total = shared[0];
  __syncthreads();  // `shared` may be reused by the caller
  return total;
}

__device__ __forceinline__ float reciprocal_sqrt(float v) { return ::rsqrtf(v); }
__device__ __forceinline__ double reciprocal_sqrt(double v) { return ::rsqrt(v); }

// ---- forward: one block per row -------------------------------------------------------------

template <typename x_t, typename out_t, int VEC>
__global__ void forward_kernel(const x_t* __restrict__ x, const at::opmath_type<x_t>* __restrict__ w,
                               out_t* __restrict__ y, at::opmath_type<x_t>* __restrict__ rstd,
                               int64_t D, at::opmath_type<x_t> eps) {
  using acc_t = at::opmath_type<x_t>;
  __shared__ acc_t shared[kWarp];
  const int64_t row = blockIdx.x;
  const auto* xr = reinterpret_cast<const Pack<x_t, VEC>*>(x + row * D);   // (D / VEC,) packs
  const auto* wr = reinterpret_cast<const Pack<acc_t, VEC>*>(w);
  auto* yr = reinterpret_cast<Pack<out_t, VEC>*>(y + row * D);
  const int64_t packs = D / VEC;

  acc_t sumsq = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<x_t, VEC> xv = xr[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t v = static_cast<acc_t>(xv.v[k]);
      sumsq += v * v;
    }
  }
  const acc_t r = reciprocal_sqrt(block_sum(sumsq, shared) / static_cast<acc_t>(D) + eps);
  if (threadIdx.x == 0) rstd[row] = r;

  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {   // second read: from L1/L2
    const Pack<x_t, VEC> xv = xr[p];
    const Pack<acc_t, VEC> wv = wr[p];
    Pack<out_t, VEC> yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t n = static_cast<acc_t>(static_cast<x_t>(static_cast<acc_t>(xv.v[k]) * r));  // cast_x
      yv.v[k] = static_cast<out_t>(n * wv.v[k]);
    }
    yr[p] = yv;
  }
}

// ---- backward: dx, one block per row ---------------------------------------------------------

template <typename x_t, typename out_t, int VEC>
__global__ void backward_dx_kernel(const out_t* __restrict__ g, const x_t* __restrict__ x,
                                   const at::opmath_type<x_t>* __restrict__ w,
                                   const at::opmath_type<x_t>* __restrict__ rstd, x_t* __restrict__ dx,
                                   int64_t D) {
  using acc_t = at::opmath_type<x_t>;
  __shared__ acc_t shared[kWarp];
  const int64_t row = blockIdx.x;
  const auto* gr = reinterpret_cast<const Pack<out_t, VEC>*>(g + row * D);
  const auto* xr = reinterpret_cast<const Pack<x_t, VEC>*>(x + row * D);
  const auto* wr = reinterpret_cast<const Pack<acc_t, VEC>*>(w);
  auto* dxr = reinterpret_cast<Pack<x_t, VEC>*>(dx + row * D);
  const int64_t packs = D / VEC;
  const acc_t r = rstd[row];

  acc_t dot = 0;   // sum(g * w * x)
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<out_t, VEC> gv = gr[p];
    const Pack<x_t, VEC> xv = xr[p];
    const Pack<acc_t, VEC> wv = wr[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      dot += static_cast<acc_t>(gv.v[k]) * wv.v[k] * static_cast<acc_t>(xv.v[k]);
  }
  const acc_t c = r * r * r * block_sum(dot, shared) / static_cast<acc_t>(D);

  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<out_t, VEC> gv = gr[p];
    const Pack<x_t, VEC> xv = xr[p];
    const Pack<acc_t, VEC> wv = wr[p];
    Pack<x_t, VEC> dv;
#pragma unroll
    for (int k = 0; k < VEC; ++k)   // dx = r * g*w - x * (r^3 * mean(g*w*x))
      dv.v[k] = static_cast<x_t>(r * (static_cast<acc_t>(gv.v[k]) * wv.v[k]) - c * static_cast<acc_t>(xv.v[k]));
    dxr[p] = dv;
  }
}

// ---- backward: dw, a deterministic column reduction --------------------------------------------

// grid (ceil(D / 32), groups), block (32, kDwRowLanes): partial[group, j] = sum over the group's rows
template <typename x_t, typename out_t>
__global__ void backward_dw_partial_kernel(const out_t* __restrict__ g, const x_t* __restrict__ x,
                                           const at::opmath_type<x_t>* __restrict__ rstd,
                                           at::opmath_type<x_t>* __restrict__ partial, int64_t N, int64_t D) {
  using acc_t = at::opmath_type<x_t>;
  __shared__ acc_t tile[kDwRowLanes][kWarp + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t groups = gridDim.y;
  const int64_t row_begin = N * blockIdx.y / groups, row_end = N * (blockIdx.y + 1) / groups;
  acc_t s = 0;
  if (j < D) {
    for (int64_t i = row_begin + threadIdx.y; i < row_end; i += blockDim.y) {
      const acc_t n = static_cast<acc_t>(static_cast<x_t>(static_cast<acc_t>(x[i * D + j]) * rstd[i]));
      s += static_cast<acc_t>(g[i * D + j]) * n;           // g * cast_x(x * r)
    }
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < D) {
    acc_t total = 0;
    for (int k = 0; k < static_cast<int>(blockDim.y); ++k) total += tile[k][threadIdx.x];
    partial[blockIdx.y * D + j] = total;
  }
}

template <typename acc_t>
__global__ void backward_dw_finish_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ dw,
                                          int64_t groups, int64_t D) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  acc_t total = 0;
  for (int64_t b = 0; b < groups; ++b) total += partial[b * D + j];   // groups in order
  dw[j] = total;
}

// ---- launch helpers --------------------------------------------------------------------------

int row_threads(int64_t packs) {
  const int64_t t = ((packs + kWarp - 1) / kWarp) * kWarp;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(kWarp, t)));
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// 16-byte packs of x_t when the row length and every pointer allow it, else one element at a time.
template <typename x_t, typename out_t>
bool can_use_packs(int64_t D, std::initializer_list<std::pair<const void*, int64_t>> ptrs) {
  constexpr int VEC = 16 / sizeof(x_t);
  if (D % VEC != 0) return false;
  for (const auto& [p, elem_bytes] : ptrs)
    if (!aligned(p, VEC * elem_bytes)) return false;
  return true;
}

template <typename x_t, typename out_t>
void launch_forward(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd,
                    int64_t N, int64_t D, double eps) {
  using acc_t = at::opmath_type<x_t>;
  constexpr int VEC = 16 / sizeof(x_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const x_t* xp = x.const_data_ptr<x_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  out_t* yp = y.data_ptr<out_t>();
  acc_t* rp = rstd.data_ptr<acc_t>();
  if (can_use_packs<x_t, out_t>(D, {{xp, sizeof(x_t)}, {wp, sizeof(acc_t)}, {yp, sizeof(out_t)}})) {
    forward_kernel<x_t, out_t, VEC><<<N, row_threads(D / VEC), 0, stream>>>(xp, wp, yp, rp, D, static_cast<acc_t>(eps));
  } else {
    forward_kernel<x_t, out_t, 1><<<N, row_threads(D), 0, stream>>>(xp, wp, yp, rp, D, static_cast<acc_t>(eps));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename x_t, typename out_t>
void launch_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                     at::Tensor& dx, at::Tensor& dw, int64_t N, int64_t D) {
  using acc_t = at::opmath_type<x_t>;
  constexpr int VEC = 16 / sizeof(x_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const out_t* gp = g.const_data_ptr<out_t>();
  const x_t* xp = x.const_data_ptr<x_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* rp = rstd.const_data_ptr<acc_t>();
  x_t* dxp = dx.data_ptr<x_t>();
  if (can_use_packs<x_t, out_t>(D, {{gp, sizeof(out_t)}, {xp, sizeof(x_t)}, {wp, sizeof(acc_t)}, {dxp, sizeof(x_t)}})) {
    backward_dx_kernel<x_t, out_t, VEC><<<N, row_threads(D / VEC), 0, stream>>>(gp, xp, wp, rp, dxp, D);
  } else {
    backward_dx_kernel<x_t, out_t, 1><<<N, row_threads(D), 0, stream>>>(gp, xp, wp, rp, dxp, D);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t groups = std::min<int64_t>(kDwMaxGroups, (N + kDwRowsPerGroup - 1) / kDwRowsPerGroup);
  at::Tensor partial = at::empty({groups, D}, x.options().dtype(dw.scalar_type()));   // (groups, D)
  const dim3 grid((D + kWarp - 1) / kWarp, groups), block(kWarp, kDwRowLanes);
  backward_dw_partial_kernel<x_t, out_t><<<grid, block, 0, stream>>>(gp, xp, rp, partial.data_ptr<acc_t>(), N, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  backward_dw_finish_kernel<acc_t><<<(D + 255) / 256, 256, 0, stream>>>(partial.const_data_ptr<acc_t>(),
                                                                        dw.data_ptr<acc_t>(), groups, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- the op's CUDA kernels --------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> fused_rms_norm_forward_cuda(const at::Tensor& x_in,
                                                               const at::Tensor& weight, double eps) {
  const auto out_dtype = check_and_out_dtype(x_in, weight, "fused_rms_norm_forward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : x.numel() / D;
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  auto rstd_shape = x.sizes().vec();
  rstd_shape.pop_back();
  at::Tensor rstd = at::empty(rstd_shape, x.options().dtype(acc_dtype));
  if (N == 0 || D == 0) return {y, rstd};
  TORCH_CHECK(N <= INT32_MAX, "fused_rms_norm_forward: too many rows for one CUDA grid: ", N);
  const at::Tensor w = weight.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_rms_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == x.scalar_type()) {
      launch_forward<scalar_t, scalar_t>(x, w, y, rstd, N, D, eps);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      launch_forward<scalar_t, float>(x, w, y, rstd, N, D, eps);
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> fused_rms_norm_backward_cuda(const at::Tensor& grad_y,
                                                                const at::Tensor& x_in,
                                                                const at::Tensor& weight,
                                                                const at::Tensor& rstd_in) {
  const auto out_dtype = check_and_out_dtype(x_in, weight, "fused_rms_norm_backward");
  const auto acc_dtype = at::toOpMathType(x_in.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "fused_rms_norm_backward: grad_y has shape ",
              grad_y.sizes(), " but x has shape ", x_in.sizes());
  TORCH_CHECK(rstd_in.numel() * x_in.size(-1) == x_in.numel(),
              "fused_rms_norm_backward: rstd must hold one value per row of x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_y.to(out_dtype).contiguous();
  const at::Tensor rstd = rstd_in.to(acc_dtype).contiguous();
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : x.numel() / D;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (N == 0 || D == 0) return {dx, at::zeros(weight.sizes(), weight.options())};
  TORCH_CHECK(N <= INT32_MAX, "fused_rms_norm_backward: too many rows for one CUDA grid: ", N);
  const at::Tensor w = weight.to(acc_dtype).contiguous();
  at::Tensor dw = at::empty({D}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_rms_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (out_dtype == x.scalar_type()) {
      launch_backward<scalar_t, scalar_t>(g, x, w, rstd, dx, dw, N, D);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      launch_backward<scalar_t, float>(g, x, w, rstd, dx, dw, N, D);
    }
  });
  return {dx, dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(minimind, CUDA, m) {
  m.impl("fused_rms_norm_forward", &fused_rms_norm_forward_cuda);
  m.impl("fused_rms_norm_backward", &fused_rms_norm_backward_cuda);
}

}  // namespace minimind
