// Fused splice for the CPU: every output row is written exactly once, from h or from an image.
//
//   forward    out[b, t] = images[b, n, t - s]   if s = starts[b, n] <= t < s + L (image n is placed)
//                        = h[b, t]               otherwise
//   backward   grad_h[b, t]         = grad[b, t] outside the placed images, 0 inside them
//              grad_images[b, n, j] = grad[b, s + j] for a placed image n, 0 for an unplaced one
//
// `starts` (B, N) int64: where image n of row b starts, or T when it has no run. `image_starts`
// below finds them with the contract's scan (the same as `minimind_v.splice.image_starts`). The vectorized torch `splice` copies all of h and then writes the image
// rows over it, so image positions are written twice; with two 196-row images in a 640-row row that
// is 1.6x the memory traffic of one copy of h. Here a row is a few contiguous segments (text, image,
// text, ...), each one memcpy, so the traffic is that of one copy. Works for every dtype (bytes).
//
// Parallelism: rows b are independent; `at::parallel_for` splits them across threads.
// The schemas are added to the `minimind` library here (TORCH_LIBRARY_FRAGMENT); the Python side
// (minimind_v/ops.py) adds the fake kernels, the autograd formula and `fused_splice`.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

namespace minimind {

// Checks the starts of every row: each in [0, T]; a placed image (start < T) fits in the row and
// begins at or after the end of the previous placed image of that row.
static void check_starts(const at::Tensor& starts, int64_t B, int64_t N, int64_t T, int64_t L,
                         const char* who) {
  TORCH_CHECK(starts.scalar_type() == at::kLong, who, ": starts must be int64, got ", starts.scalar_type());
  TORCH_CHECK(starts.dim() == 2 && starts.size(0) == B && starts.size(1) == N, who,
              ": starts must be (B, N) = (", B, ", ", N, "), got ", starts.sizes());
  TORCH_CHECK(starts.device().is_cpu(), who, ": starts must be on the CPU");
  const at::Tensor s = starts.contiguous();
  const int64_t* p = s.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t free_from = 0;  // first position after the last placed image of this row
    for (int64_t n = 0; n < N; ++n) {
      const int64_t st = p[b * N + n];
      TORCH_CHECK(st >= 0 && st <= T, who, ": starts[", b, ", ", n, "] = ", st, " is outside [0, ", T, "]");
      if (st == T) continue;  // image n of this row has no run
      TORCH_CHECK(st >= free_from && st + L <= T, who, ": starts[", b, ", ", n, "] = ", st,
                  " overlaps the previous image or runs past the row (T = ", T, ", L = ", L, ")");
      free_from = st + L;
    }
  }
}

// (B, T) ids, pattern (L,) -> starts (B, N) int64: the greedy left-to-right scan of the contract
// (`minimind_v.splice`): a run is L ids equal to the pattern, the scan resumes after a run, the
// n-th run of a row gets image n, runs beyond N stay text, and an image without a run gets T.
at::Tensor image_starts_cpu(const at::Tensor& input_ids_in, const at::Tensor& pattern_in, int64_t N) {
  TORCH_CHECK(input_ids_in.dim() == 2, "image_starts: input_ids must be (B, T), got ", input_ids_in.sizes());
  TORCH_CHECK(pattern_in.dim() == 1 && pattern_in.numel() >= 1, "image_starts: pattern must be a non-empty "
              "(L,) tensor, got ", pattern_in.sizes());
  TORCH_CHECK(N >= 0, "image_starts: N must be >= 0, got ", N);
  TORCH_CHECK(input_ids_in.device().is_cpu() && pattern_in.device().is_cpu(), "image_starts: input_ids and "
              "pattern must be on the CPU");
  const at::Tensor ids = input_ids_in.to(at::kLong).contiguous();
  const at::Tensor pattern = pattern_in.to(at::kLong).contiguous();
  const int64_t B = ids.size(0), T = ids.size(1), L = pattern.numel();
  at::Tensor starts = at::empty({B, N}, ids.options());
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t* pat = pattern.const_data_ptr<int64_t>();
  int64_t* st = starts.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* row = id + b * T;
      int64_t n = 0;
      for (int64_t s = 0; s + L <= T && n < N;) {
        int64_t j = 0;
        while (j < L && row[s + j] == pat[j]) ++j;
        if (j == L) {           // a run: image n goes here, the scan resumes after it
          st[b * N + n++] = s;
          s += L;
        } else {
          ++s;
        }
      }
      for (; n < N; ++n) st[b * N + n] = T;   // images without a run
    }
  });
  return starts;
}

// The walk both directions share. Row b of the output is text, image, text, ... in order:
// `text(r, rows)` is called for each run of text positions (r: its first row in the flat (B*T, D)
// layout; rows may be 0), `image(i, r)` for each image i = b * N + n (r: its first flat row, or -1
// for an image without a run).
template <typename Text, typename Image>
static void for_each_segment(const int64_t* st, int64_t B, int64_t N, int64_t T, int64_t L, Text text, Image image) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const size_t row0 = static_cast<size_t>(b) * T;  // first row of batch row b in (B*T, D)
      int64_t t = 0;                                   // next position of row b not yet covered
      for (int64_t n = 0; n < N; ++n) {
        const int64_t s = st[b * N + n];
        const size_t i = static_cast<size_t>(b * N + n);
        if (s == T) {
          image(i, int64_t{-1});
          continue;
        }
        text(row0 + t, s - t);
        image(i, static_cast<int64_t>(row0 + s));
        t = s + L;
      }
      text(row0 + t, T - t);
    }
  });
}

// out (B, T, D) = h with the placed images written in: segments of h and of the images, one memcpy each.
at::Tensor splice_rows_cpu(const at::Tensor& h_in, const at::Tensor& images_in, const at::Tensor& starts_in) {
  TORCH_CHECK(h_in.dim() == 3, "splice_rows: h must be (B, T, D), got ", h_in.sizes());
  const int64_t B = h_in.size(0), T = h_in.size(1), D = h_in.size(2);
  TORCH_CHECK(images_in.dim() == 4 && images_in.size(0) == B && images_in.size(3) == D,
              "splice_rows: images must be (B, N, L, D) with B = ", B, " and D = ", D, ", got ", images_in.sizes());
  TORCH_CHECK(images_in.scalar_type() == h_in.scalar_type(), "splice_rows: images have dtype ",
              images_in.scalar_type(), " but h has ", h_in.scalar_type());
  TORCH_CHECK(h_in.device().is_cpu() && images_in.device().is_cpu(), "splice_rows: h and images must be on the CPU");
  const int64_t N = images_in.size(1), L = images_in.size(2);
  check_starts(starts_in, B, N, T, L, "splice_rows");

  const at::Tensor h = h_in.contiguous(), images = images_in.contiguous(), starts = starts_in.contiguous();
  at::Tensor out = at::empty({B, T, D}, h.options());
  const size_t row_bytes = static_cast<size_t>(D) * h.element_size();
  const char* src_h = static_cast<const char*>(h.const_data_ptr());
  const char* src_img = static_cast<const char*>(images.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* st = starts.const_data_ptr<int64_t>();

  for_each_segment(st, B, N, T, L, [&](size_t r, int64_t rows) {     // text: rows of h
    std::memcpy(dst + r * row_bytes, src_h + r * row_bytes, rows * row_bytes);
  }, [&](size_t i, int64_t r) {                                    // image i at flat row r
    if (r >= 0) std::memcpy(dst + r * row_bytes, src_img + i * L * row_bytes, L * row_bytes);
  });
  return out;
}

// grad (B, T, D) -> grad_h (B, T, D) (zero inside placed images), grad_images (B, N, L, D).
std::tuple<at::Tensor, at::Tensor> splice_rows_backward_cpu(const at::Tensor& grad_in, const at::Tensor& starts_in,
                                                           int64_t L) {
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.device().is_cpu(), "splice_rows_backward: grad must be a (B, T, D) "
              "CPU tensor, got ", grad_in.sizes());
  TORCH_CHECK(L >= 1, "splice_rows_backward: L must be >= 1, got ", L);
  const int64_t B = grad_in.size(0), T = grad_in.size(1), D = grad_in.size(2);
  TORCH_CHECK(starts_in.dim() == 2, "splice_rows_backward: starts must be (B, N), got ", starts_in.sizes());
  const int64_t N = starts_in.size(1);
  check_starts(starts_in, B, N, T, L, "splice_rows_backward");

  const at::Tensor grad = grad_in.contiguous(), starts = starts_in.contiguous();
  at::Tensor grad_h = at::empty({B, T, D}, grad.options());
  at::Tensor grad_images = at::empty({B, N, L, D}, grad.options());
  const size_t row_bytes = static_cast<size_t>(D) * grad.element_size();
  const char* g = static_cast<const char*>(grad.const_data_ptr());
  char* gh = static_cast<char*>(grad_h.data_ptr());
  char* gi = static_cast<char*>(grad_images.data_ptr());
  const int64_t* st = starts.const_data_ptr<int64_t>();

  for_each_segment(st, B, N, T, L, [&](size_t r, int64_t rows) {     // text: the gradient goes to h
    std::memcpy(gh + r * row_bytes, g + r * row_bytes, rows * row_bytes);
  }, [&](size_t i, int64_t r) {
    char* img = gi + i * L * row_bytes;
    if (r < 0) {                                                     // unplaced image: no gradient reaches it
      std::memset(img, 0, L * row_bytes);
    } else {
      std::memset(gh + r * row_bytes, 0, L * row_bytes);             // h's values there were replaced
      std::memcpy(img, g + r * row_bytes, L * row_bytes);
    }
  });
  return {grad_h, grad_images};
}

TORCH_LIBRARY_FRAGMENT(minimind, m) {
  // starts (B, N) int64: where image n of row b starts (greedy, non-overlapping runs of `pattern`), or T
  m.def("image_starts(Tensor input_ids, Tensor pattern, int N) -> Tensor");
  // out (B, T, D): h with image n of row b written at rows [starts[b, n], starts[b, n] + L); starts == T: unplaced
  m.def("splice_rows(Tensor h, Tensor images, Tensor starts) -> Tensor");
  // (grad_h (B, T, D), grad_images (B, N, L, D))
  m.def("splice_rows_backward(Tensor grad, Tensor starts, int L) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minimind, CPU, m) {
  m.impl("image_starts", &image_starts_cpu);
  m.impl("splice_rows", &splice_rows_cpu);
  m.impl("splice_rows_backward", &splice_rows_backward_cpu);
}

}  // namespace minimind
