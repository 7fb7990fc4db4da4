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
#include <atomic>
#include <type_traits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace dlkunet {
namespace cpu {

using at::Tensor;

constexpr int64_t kMaxKernel = 63;       // bounds the on-stack tap list; far beyond any ablation size
constexpr int64_t kMinTilePixels = 192;  // below this the tiles' short GEMMs lose to one whole-batch GEMM
constexpr int64_t kChunk = 256;          // pixels per task of the elementwise passes

// ---- checks --------------------------------------------------------------------------------------

// The kernels check only what keeps them memory-safe: tensors with CPU data, a floating dtype, and
// the shapes the loops index by (weights of the wrong size would be read out of bounds, kernels
// over kMaxKernel overflow the on-stack tap lists, a dilation below 1 walks backwards).  Users'
// mistakes get their messages earlier, in Python (dlkunet/ops/validation.py); DLK_CHECK fires only
// when a kernel is called directly with arguments it could not run safely.
#define DLK_CHECK(cond, ...) \
  TORCH_CHECK(cond, "dlkunet cpu kernel: unsafe arguments (failed: " #cond "): ", __VA_ARGS__)

inline void check_tensor(const char* op, const char* name, const Tensor& t) {
  DLK_CHECK(t.defined() && t.device().is_cpu() && at::isFloatingType(t.scalar_type()), op, " ", name);
}

inline void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape) {
  check_tensor(op, name, t);
  DLK_CHECK(t.sizes() == shape, op, " ", name, " has shape ", t.sizes(), ", the kernel indexes it as ", shape);
}

inline void check_x(const char* op, const char* name, const Tensor& x) {
  check_tensor(op, name, x);
  DLK_CHECK(x.dim() == 4 && x.numel() > 0, op, " ", name, " has shape ", x.sizes());
}

// Returns k for a depthwise weight (C, 1, k, k), k odd and at most kMaxKernel.
inline int64_t check_depthwise(const char* op, const char* name, const Tensor& w, int64_t C) {
  check_tensor(op, name, w);
  DLK_CHECK(w.dim() == 4 && w.size(2) % 2 == 1 && w.size(2) <= kMaxKernel, op, " ", name, " has shape ", w.sizes());
  check_shape(op, name, w, {C, 1, w.size(2), w.size(2)});
  return w.size(2);
}

// The memory format of the outputs: the rule of dlkunet/ops/library.py's fake kernels.
// suggest_memory_format is stride-based (ATen's is_channels_last_strides_2d), as dlkunet/ops/layout.py.
inline at::MemoryFormat output_format(const Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

inline at::ScalarType compute_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- cache-line aligned buffers ------------------------------------------------------------------

// The kernels' own buffers, 64-byte aligned.  The depthwise rows are read and written as 32-byte
// vectors, and std::vector's storage is 16-byte aligned (glibc), which splits every other vector
// across two cache lines: the 7x7 row kernel ran about a quarter slower so (measured, one core).
constexpr size_t kCacheLine = 64;

// At least `bytes`, 64-byte aligned, released with std::free; throws std::bad_alloc.
inline void* cache_line_alloc(size_t bytes) {
  void* p = std::aligned_alloc(kCacheLine, std::max((bytes + kCacheLine - 1) / kCacheLine * kCacheLine, kCacheLine));
  if (!p) throw std::bad_alloc();
  return p;
}

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(cache_line_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// ---- scratch kept between calls (scratch.cpp) ---------------------------------------------------

// One buffer per slot and calling thread; a kernel takes each slot at most once per call, and never
// for a tensor it returns (the next call would overwrite it).
enum class Slot { kInput, kGrad, kDepthwise, kDepthwise2, kPointwise, kPackedWeight, kCount };
// A tensor of `sizes` (contiguous) over the slot's buffer, grown when too small; uninitialised.
Tensor scratch(Slot slot, at::IntArrayRef sizes, at::ScalarType dtype);
int64_t scratch_bytes();  // held by the calling thread
int64_t release_scratch();  // frees the calling thread's buffers and the output cache's free blocks; bytes freed
// A tensor for a kernel's output (contiguous in `fmt`), from the output cache when it is large.
Tensor output_empty(at::IntArrayRef sizes, const at::TensorOptions& opts,
                    at::MemoryFormat fmt = at::MemoryFormat::Contiguous);
// The same for an output with x's sizes, dtype and strides (x dense), as at::empty_like.
Tensor output_like(const Tensor& x);
int64_t cached_output_bytes();  // free blocks the output cache holds (all threads)
int64_t output_cache_limit();   // the most it keeps (DLKUNET_CPU_CACHE_MB, else a share of physical memory)

// float -> float: the vectorised 8x8-block version of transpose_block (primitives.cpp).
void transpose_f32(const float* src, float* dst, int64_t R, int64_t P, int64_t r0, int64_t r1, int64_t p0,
                   int64_t p1);

// dst[p * R + r] = src[r * P + p] for one (R x P) matrix, converting the element type; blocked so
// that both sides move whole cache lines (ATen's generic permute-copy is ~5x slower here).
template <typename src_t, typename dst_t>
void transpose_block(const src_t* src, dst_t* dst, int64_t R, int64_t P, int64_t r0, int64_t r1, int64_t p0,
                     int64_t p1) {
  if constexpr (std::is_same<src_t, float>::value && std::is_same<dst_t, float>::value) {
    transpose_f32(src, dst, R, P, r0, r1, p0, p1);
    return;
  }
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

// (N, C, H, W) in any layout/dtype -> contiguous (N, H, W, C) in dtype `t` (a view when it already
// is); a transposed copy goes to the `slot` scratch buffer.
inline Tensor to_nhwc(const Tensor& x, at::ScalarType t, Slot slot) {
  if (x.is_contiguous() && x.size(1) > 1 && x.size(2) * x.size(3) > 1) {
    Tensor out = scratch(slot, {x.size(0), x.size(2), x.size(3), x.size(1)}, t);
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
    Tensor out = output_empty({buf.size(0), buf.size(3), buf.size(1), buf.size(2)}, x.options());
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

// ---- ISA-cloned primitives (primitives.cpp), for T = float and double ------------------------------

// out[w, c] (+)= bias[c] + sum_{i,j} in[h + i*dil - pad, w + j*dil - pad, c] * wt[i*k + j, c], with
// pad = dil*(k-1)/2 and zeros outside the H x W image, for channels c in [c0, c1) (every channel
// when c1 < 0).  `in` is one (H, W, C) image; out is one row.
// gw[i*k + j, c] += sum_w dout_row[w, c] * in[h + i*dil - pad, w + j*dil - pad, c]: the weight
// gradient contribution of output row h; also gb[c] += sum_w dout_row[w, c] when gb is not null.
// affine_act: dst[r, c] = act(src[r, c] * a + b), (a, b) per column or per row, a == nullptr: 1.
// bias_moments: Z += bias in place, then per-channel mean and M2 of the block (two-pass, exact).
// gate: dst = x * (O + b1).  gate_backward: GX = G * (O + b1), O <- G * X, gb += column sums of O.

// Per-channel constants of the BatchNorm + ReLU backward.  xhat = (z + shift) * invstd, where z is
// the pointwise output without its bias (shift = b_pw - mean); scale = gamma * invstd; mean_g and
// mean_gx are the batch means of g and g * xhat (training only).
template <typename T>
struct BnActBackwardCoef {
  const T *shift, *invstd, *gamma, *beta, *scale, *mean_g, *mean_gx;
};

#define DLK_DECLARE(T)                                                                                            \
  void dw_row(const T* in, int64_t H, int64_t W, int64_t C, int64_t h, const T* wt, const T* bias, int64_t k,     \
              int64_t dil, T* out, bool accumulate, int64_t c0 = 0, int64_t c1 = -1);                             \
  void dw_wgrad_row(const T* dout_row, const T* in, int64_t H, int64_t W, int64_t C, int64_t h, int64_t k,        \
                    int64_t dil, T* gw, T* gb);                                                                   \
  void affine_act(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t R, int64_t Cn, const T* a, const T* b, \
                  bool per_col, bool relu);                                                                       \
  void bias_moments(T* Z, int64_t ldz, int64_t R, int64_t Cn, const T* bias, bool per_col, T* mean, T* m2);      \
  /* Z (P x Cout) holds z minus its bias; on exit dz when write.  Adds sums of g, g * xhat (and dz in eval). */   \
  void bn_act_backward(T* Z, const T* G, int64_t P, int64_t Cout, const BnActBackwardCoef<T>& k, bool training,   \
                       bool relu, bool write, T* sg, T* sgx, T* sdz);                                             \
  void gate(T* dst, int64_t ldd, const T* x, int64_t ldx, const T* O, int64_t ldo, int64_t R, int64_t Cn,        \
            const T* b1, bool per_col);                                                                           \
  void gate_backward(const T* G, const T* X, T* O, const T* b1, T* GX, int64_t P, int64_t C, T* gb);
DLK_DECLARE(float)
DLK_DECLARE(double)
#undef DLK_DECLARE

// ---- blocked depthwise rows (depthwise.cpp), float32 forward ------------------------------------

constexpr int64_t kBlock = 16;  // channels per block: one 64-byte line
inline int64_t blocks_of(int64_t C) { return (C + kBlock - 1) / kBlock; }
// Depthwise weight (C, 1, k, k) -> float (blocks, k*k, 16), channels past C zero; bias (C) -> (blocks*16).
Tensor block_taps(const Tensor& w);
Tensor block_bias(const Tensor& b);
// One output row of one channel block: out[w * os + c] = bias[c] + sum_t sum_j rows[t][(w + j*dil)*16 + c]
// * wt[(wrows[t]*k + j)*16 + c], for w < W, c < 16.  rows[t]: padded blocked rows (zero outside).
void dw_row_blocked(const float* const* rows, const int* wrows, int nrows, const float* wt, const float* bias,
                    int64_t k, int64_t dil, int64_t W, float* out, int64_t os);
// Channel block cb of one NHWC row (W x C) -> dst: pad zero pixels, W pixels, pad zero pixels (16 floats each).
void pack_row_blocked(const float* src, int64_t W, int64_t C, int64_t cb, int64_t pad, float* dst);
// Rows [r0, r1) of depthwise(img) for channel blocks [cb0, cb1) (img: one NHWC image), into
// out + (r - r0) * W * ldo + cb * 16 (pixel stride ldo >= blocks*16).
void dw_rows_blocked(const float* img, int64_t H, int64_t W, int64_t C, int64_t r0, int64_t r1, int64_t cb0,
                     int64_t cb1, const float* wtb, const float* bb, int64_t k, int64_t dil, float* out, int64_t ldo);
const char* blocked_isa();  // "avx512", "avx2" or "generic": the row kernel in use
bool blocked_disabled();    // DLKUNET_CPU_BLOCKED=0: the float32 forwards take the unblocked path (A/B runs)

// ---- the tiles' pointwise GEMM (tile_gemm.cpp), float32 -----------------------------------------

// B (K x N) in panels of 16 columns, zero-padded past N; from row-major B (K x N, ld), or from its
// transpose (N x K, ld: a weight (Cout, Cin)) when `transposed`.  Held in the calling thread's
// kPackedWeight scratch: one PackedB per thread at a time.
struct PackedB {
  Tensor buffer;
  float* data;
  int64_t N, K;
  PackedB(const float* B, int64_t ld, bool transposed, int64_t N, int64_t K);
};
// Whether tile_gemm runs here (AVX2 without AVX-512, unless DLKUNET_CPU_GEMM=mkl); else use gemm<float>.
bool tile_gemm_available();
// C (M x N, ldc) = A (M x K, lda) * B, overwriting C; single-threaded, for one tile.
void tile_gemm(const float* A, int64_t lda, const PackedB& B, float* C, int64_t ldc, int64_t M);
// The same on all threads (call it outside a parallel region): the whole-batch plans' GEMMs.
void parallel_gemm(const float* A, int64_t lda, const PackedB& B, float* C, int64_t ldc, int64_t M);

// A weight W for the tiles' GEMMs, given as (N x K) when transposed (a pointwise conv's (Cout, Cin))
// else (K x N): packed once for tile_gemm where it runs and `pack` allows, else at::mm per tile.
template <typename T>
struct TileWeight {
  const T* W;
  bool transposed;
  int64_t N, K;
  std::unique_ptr<PackedB> packed;
  TileWeight(const T* w, bool t, int64_t n, int64_t k, bool pack) : W(w), transposed(t), N(n), K(k) {
    if constexpr (std::is_same<T, float>::value) {
      if (pack && tile_gemm_available()) packed = std::make_unique<PackedB>(W, ld(), transposed, N, K);
    }
  }
  int64_t ld() const { return transposed ? K : N; }
  // C (M x N, ldc) = A (M x K, lda) * W, on the calling thread.
  void times(const T* A, int64_t lda, T* C, int64_t ldc, int64_t M) const {
    if constexpr (std::is_same<T, float>::value) {
      if (packed) {
        tile_gemm(A, lda, *packed, C, ldc, M);
        return;
      }
    }
    gemm<T>(false, A, lda, transposed, W, ld(), C, ldc, M, N, K, false);
  }
};

// C (M x N, ldc) = A (M x K, lda) times a weight W, given as (N x K) when w_transposed (a pointwise
// conv's (Cout, Cin)) else (K x N), on all threads: parallel_gemm where it runs, else at::mm.
template <typename T>
void weight_gemm(const T* A, int64_t lda, const T* W, bool w_transposed, T* C, int64_t ldc, int64_t M, int64_t N,
                 int64_t K) {
  const int64_t ldw = w_transposed ? K : N;
  if constexpr (std::is_same<T, float>::value) {
    if (tile_gemm_available()) {
      parallel_gemm(A, lda, PackedB(W, ldw, w_transposed, N, K), C, ldc, M);
      return;
    }
  }
  gemm<T>(false, A, lda, w_transposed, W, ldw, C, ldc, M, N, K, false);
}

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

// Rows [r0, r1) of depthwise(img) + bias into out (row r0 first).
template <typename T>
void depthwise_rows(const T* img, int64_t H, int64_t W, int64_t C, int64_t r0, int64_t r1, const T* wt,
                    const T* bias, int64_t k, int64_t dil, T* out) {
  for (int64_t r = r0; r < r1; ++r) dw_row(img, H, W, C, r, wt, bias, k, dil, out + (r - r0) * W * C, false);
}

// out = depthwise(X) + bias for a whole batch of (H, W, C) images, in parallel over (image, block
// of rows), and over channel groups too when that alone leaves threads idle (small deep maps).
// Otherwise all channels of a pixel in one sweep: sweeping 16-channel groups (to keep a dilated
// window in L2) was not faster here (lka_gate at 1x96x224x224: 34-37 ms against 30-31 ms).
template <typename T>
void depthwise_all(const T* X, int64_t N, int64_t H, int64_t W, int64_t C, const T* wt, const T* bias, int64_t k,
                   int64_t dil, T* out) {
  constexpr int64_t kRows = 16, kLine = 64 / sizeof(T);
  const int64_t row_blocks = (H + kRows - 1) / kRows;
  const int64_t want = 4 * at::get_num_threads(), blocks = N * row_blocks;
  const int64_t lines = (C + kLine - 1) / kLine;
  const int64_t groups = blocks >= want ? 1 : std::min(lines, (want + blocks - 1) / blocks);
  const int64_t group_c = (lines + groups - 1) / groups * kLine;
  at::parallel_for(0, blocks * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (row_blocks * groups), rb = t / groups % row_blocks, c0 = t % groups * group_c;
      if (c0 >= C) continue;
      for (int64_t r = rb * kRows; r < std::min(H, (rb + 1) * kRows); ++r)
        dw_row(X + n * H * W * C, H, W, C, r, wt, bias, k, dil, out + (n * H + r) * W * C, false, c0,
               std::min(C, c0 + group_c));
    }
  });
}

// Runs worker(next) once on every thread; next() returns the index of a task in [0, count) that no
// thread has claimed yet, or -1.  Threads claim tasks as they free up, instead of at::parallel_for's
// fixed split: on a shared machine one core can run slower than the other for a while, and a fixed
// split then waits for it.  Only for tasks whose results do not depend on which thread runs them
// (no per-thread accumulators).
template <typename Worker>
void claim_tasks(int64_t count, const Worker& worker) {
  std::atomic<int64_t> claimed{0};
  auto next = [&]() -> int64_t {
    const int64_t t = claimed++;
    return t < count ? t : -1;
  };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { worker(next); });
}

// Calls fn(t) for every t in [0, count), tasks claimed as threads free up (claim_tasks).
template <typename Fn>
void for_each_task(int64_t count, const Fn& fn) {
  claim_tasks(count, [&](const auto& next) {
    for (int64_t t = next(); t >= 0; t = next()) fn(t);
  });
}

// Calls fn(chunk_index, p0, p1) for consecutive chunks of `chunk` rows of a P-row matrix, in parallel.
template <typename Fn>
void for_each_chunk(int64_t P, int64_t chunk, const Fn& fn) {
  const int64_t count = (P + chunk - 1) / chunk;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i, i * chunk, std::min(P, (i + 1) * chunk));
  });
}

// Rows per tile so that a tile's channel-wide buffers (pixels x channels) stay near `bytes`.
inline int64_t tile_rows(int64_t H, int64_t W, int64_t channels, int64_t elem, int64_t bytes = 768 * 1024) {
  int64_t pixels = std::max<int64_t>(64, bytes / std::max<int64_t>(1, channels * elem));
  return std::max<int64_t>(1, std::min(H, pixels / W));
}

// Tiles of image rows keep an intermediate in L2 while the pointwise GEMM consumes it, but every
// tile's GEMM re-reads (and MKL re-packs) the whole pointwise weight.  Where tiles would be small
// (deep levels: few pixels, many channels) or too few to occupy the threads, one multi-threaded
// GEMM over the whole batch wins (measured: 2x at 1536 channels, 4x4).
struct TilePlan {
  int64_t rows, per_img, count;
  bool whole;
};

inline TilePlan plan_tiles(int64_t N, int64_t H, int64_t W, int64_t channels, int64_t elem) {
  TilePlan t;
  t.rows = tile_rows(H, W, channels, elem);
  t.per_img = (H + t.rows - 1) / t.rows;
  t.count = N * t.per_img;
  t.whole = t.rows * W < kMinTilePixels || t.count < 2 * at::get_num_threads();
  return t;
}

// Calls fn(t, n, r0, r1, scratch) for every tile t of `plan` (image n, rows [r0, r1)), in parallel.
// Each worker allocates `scratch_elems` of T once for all its tiles and runs its GEMMs on one thread.
// Tiles are claimed as threads free up (claim_tasks), unless `fixed_split`: callers that keep
// per-thread sums (ThreadSums) need the same tiles on the same thread every call, for
// deterministic results.
template <typename T, typename Fn>
void for_each_tile(const TilePlan& plan, int64_t H, int64_t scratch_elems, const Fn& fn, bool fixed_split = false) {
  auto tile = [&](int64_t t, T* scratch) {
    const int64_t n = t / plan.per_img, r0 = (t % plan.per_img) * plan.rows;
    fn(t, n, r0, std::min(H, r0 + plan.rows), scratch);
  };
  if (fixed_split) {
    at::parallel_for(0, plan.count, 1, [&](int64_t begin, int64_t end) {
      SingleThreadedBlas blas_guard;
      AlignedVector<T> scratch(static_cast<size_t>(scratch_elems));
      for (int64_t t = begin; t < end; ++t) tile(t, scratch.data());
    });
    return;
  }
  claim_tasks(plan.count, [&](const auto& next) {
    SingleThreadedBlas blas_guard;
    AlignedVector<T> scratch(static_cast<size_t>(scratch_elems));
    for (int64_t t = next(); t >= 0; t = next()) tile(t, scratch.data());
  });
}

}  // namespace cpu
}  // namespace dlkunet
