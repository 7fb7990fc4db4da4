// Private helpers of the CPU kernels: depthwise row primitives, the tile GEMM, layout glue.
//
// Internal layout: NHWC in a compute type T (float, or double for float64 inputs), channels
// contiguous, so depthwise taps vectorise over channels and a tile of pixels is a plain row-major
// (pixels x channels) matrix for the pointwise GEMM.  The hot loops use GCC vector types inside
// functions cloned per ISA (target_clones: AVX-512, AVX2, baseline) because setup.py builds with no
// ISA flags, which would leave at::vec at its generic width.
#pragma once
// ATen only (not torch/extension.h): it halves the compile time of the kernel files.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace dlkunet {
namespace cpu {

using at::Tensor;

constexpr int64_t kMaxKernel = 63;  // bounds the on-stack tap list; far beyond any ablation size

// ---- checks shared by the bindings -------------------------------------------------------------

inline void check_cpu_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device(),
              " (the cpu backend runs on CPU tensors)");
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_like_x(const char* op, const char* name, const Tensor& t, const Tensor& x,
                         at::IntArrayRef shape, bool float32_ok) {
  check_cpu_float(op, name, t);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (float32_ok && t.scalar_type() == at::kFloat), op, ": ",
              name, " has dtype ", t.scalar_type(), " but x is ", x.scalar_type(),
              float32_ok ? " (this tensor may also be float32)" : "");
}

inline void check_x(const char* op, const char* name, const Tensor& x) {
  check_cpu_float(op, name, x);
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": ", name, " is empty (shape ", x.sizes(), "); N, C, H, W must be >= 1");
}

// Returns k for a depthwise weight (C, 1, k, k) with k odd.
inline int64_t check_depthwise(const char* op, const char* name, const Tensor& w, const Tensor& x) {
  check_cpu_float(op, name, w);
  TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(2) == w.size(3), op, ": ", name,
              " must be a depthwise weight (C, 1, k, k), got shape ", w.sizes());
  const int64_t k = w.size(3);
  TORCH_CHECK(k % 2 == 1 && k <= kMaxKernel, op, ": ", name, " must have an odd kernel size <= ", kMaxKernel,
              ", got ", k);
  check_like_x(op, name, w, x, {x.size(1), 1, k, k}, false);
  return k;
}

// The memory format of the outputs: the rule of dlkunet/ops/library.py's fake kernels.
inline at::MemoryFormat output_format(const Tensor& x) {
  return (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous;
}

inline at::ScalarType compute_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// dst[p * R + r] = src[r * P + p] for one (R x P) matrix, converting the element type; blocked so
// that both sides move whole cache lines (ATen's generic permute-copy is ~5x slower here).
template <typename src_t, typename dst_t>
void transpose_block(const src_t* src, dst_t* dst, int64_t R, int64_t P, int64_t r0, int64_t r1, int64_t p0,
                     int64_t p1) {
  constexpr int64_t B = 16;
  for (int64_t pb = p0; pb < p1; pb += B) {
    const int64_t pe = std::min(p1, pb + B);
    for (int64_t rb = r0; rb < r1; rb += B) {
      const int64_t re = std::min(r1, rb + B);
      for (int64_t p = pb; p < pe; ++p)
        for (int64_t r = rb; r < re; ++r) dst[p * R + r] = static_cast<dst_t>(src[r * P + p]);
    }
  }
}

// Batched (N x R x P) -> (N x P x R) transpose-convert, parallel over pixel blocks.
template <typename src_t, typename dst_t>
void transpose_batched(const src_t* src, dst_t* dst, int64_t N, int64_t R, int64_t P) {
  const int64_t chunk = 128, pr = (R + chunk - 1) / chunk, pp = (P + chunk - 1) / chunk;
  at::parallel_for(0, N * pr * pp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (pr * pp), r0 = (t / pp % pr) * chunk, p0 = (t % pp) * chunk;
      transpose_block(src + n * R * P, dst + n * R * P, R, P, r0, std::min(R, r0 + chunk), p0,
                      std::min(P, p0 + chunk));
    }
  });
}

// (N, C, H, W) in any layout/dtype -> contiguous (N, H, W, C) in dtype `t` (a view when it already is).
inline Tensor to_nhwc(const Tensor& x, at::ScalarType t) {
  if (x.is_contiguous() && x.size(1) > 1 && x.size(2) * x.size(3) > 1) {
    Tensor out = at::empty({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options().dtype(t));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "to_nhwc", [&] {
      using src_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(t, "to_nhwc_dst", [&] {
        transpose_batched(x.data_ptr<src_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                          x.size(2) * x.size(3));
      });
    });
    return out;
  }
  return x.to(t).permute({0, 2, 3, 1}).contiguous();
}

// (N, H, W, C) compute buffer -> (N, C, H, W) in x's dtype and output layout.
inline Tensor from_nhwc(const Tensor& buf, const Tensor& x) {
  const auto fmt = output_format(x);
  if (fmt == at::MemoryFormat::Contiguous && buf.size(3) > 1 && buf.size(1) * buf.size(2) > 1) {
    Tensor out = at::empty({buf.size(0), buf.size(3), buf.size(1), buf.size(2)}, x.options());
    AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "from_nhwc", [&] {
      using src_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "from_nhwc_dst", [&] {
        transpose_batched(buf.data_ptr<src_t>(), out.data_ptr<scalar_t>(), buf.size(0),
                          buf.size(1) * buf.size(2), buf.size(3));
      });
    });
    return out;
  }
  return buf.permute({0, 3, 1, 2}).to(x.scalar_type()).contiguous(fmt);
}

// Depthwise weight (C, 1, k, k) -> (k*k, C) in `t`; `flip` rotates it 180 degrees (the transposed conv).
inline Tensor taps_major(const Tensor& w, at::ScalarType t, bool flip) {
  Tensor v = flip ? w.flip({2, 3}) : w;
  return v.to(t).reshape({w.size(0), w.size(2) * w.size(3)}).t().contiguous();
}

// MKL, when torch has it (MKL_Set_Num_Threads_Local is the C entry point; the lower-case symbol is
// the Fortran one, which takes a pointer): inside at::parallel_for each worker must run its GEMMs on one thread,
// or MKL starts its own team per call and the cores are oversubscribed (seen: 80x slower tiles).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() { if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1); }
  ~SingleThreadedBlas() { if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous); }
};

// ---- tile GEMM ----------------------------------------------------------------------------------

// Row-major C (M x N, leading dim ldc) = op(A) op(B) (+ C when accumulate); A is M x K (K x M when
// ta), B is K x N (N x K when tb).  at::mm reaches MKL/oneDNN; called inside at::parallel_for it
// runs single-threaded on a cache-sized tile.
template <typename T>
void gemm(bool ta, const T* A, int64_t lda, bool tb, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M,
          int64_t N, int64_t K, bool accumulate) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = ta ? at::from_blob(const_cast<T*>(A), {M, K}, {1, lda}, opts)
                : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  Tensor b = tb ? at::from_blob(const_cast<T*>(B), {K, N}, {1, ldb}, opts)
                : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (accumulate) {
    at::addmm_out(c, c, a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// ---- depthwise row primitives (defined in dwconv_bn_act.cpp, ISA-cloned) -----------------------

// out[w, c] (+)= bias[c] + sum_{i,j} in[h + i*dil - pad, w + j*dil - pad, c] * wt[i*k + j, c], with
// pad = dil*(k-1)/2 and zeros outside the H x W image.  `in` is one (H, W, C) image; out is one row.
void dw_row(const float* in, int64_t H, int64_t W, int64_t C, int64_t h, const float* wt, const float* bias,
            int64_t k, int64_t dil, float* out, bool accumulate);
void dw_row(const double* in, int64_t H, int64_t W, int64_t C, int64_t h, const double* wt, const double* bias,
            int64_t k, int64_t dil, double* out, bool accumulate);

// gw[i*k + j, c] += sum_w dout_row[w, c] * in[h + i*dil - pad, w + j*dil - pad, c]: the weight
// gradient contribution of output row h; also gb[c] += sum_w dout_row[w, c] when gb is not null.
void dw_wgrad_row(const float* dout_row, const float* in, int64_t H, int64_t W, int64_t C, int64_t h,
                  int64_t k, int64_t dil, float* gw, float* gb);
void dw_wgrad_row(const double* dout_row, const double* in, int64_t H, int64_t W, int64_t C, int64_t h,
                  int64_t k, int64_t dil, double* gw, double* gb);

// Per-thread accumulators, summed in thread order at the end (deterministic for a thread count).
template <typename T>
struct ThreadSums {
  int64_t size, threads;
  std::vector<T> data;
  explicit ThreadSums(int64_t n)
      : size(n), threads(at::get_num_threads()), data(static_cast<size_t>(n * threads), T(0)) {}
  T* mine() { return data.data() + size * at::get_thread_num(); }
  Tensor total() const {
    Tensor out = at::zeros({size}, at::TensorOptions().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t i = 0; i < size; ++i) o[i] += static_cast<double>(data[t * size + i]);
    return out;
  }
};

// Rows per tile so that a tile's channel-wide buffers (pixels x channels) stay near `bytes`.
inline int64_t tile_rows(int64_t H, int64_t W, int64_t channels, int64_t elem, int64_t bytes = 768 * 1024) {
  int64_t pixels = std::max<int64_t>(64, bytes / std::max<int64_t>(1, channels * elem));
  return std::max<int64_t>(1, std::min(H, pixels / W));
}

}  // namespace cpu
}  // namespace dlkunet
