// Depthwise convolution rows in a blocked layout, for the float32 forward kernels.
//
// Channels go in blocks of 16 (64 bytes: one cache line, two AVX2 registers or one AVX-512
// register).  An input row of one block is stored zero-padded left and right ("padded row": pixel
// stride 16 floats), so the inner loop has no bounds checks and walks memory contiguously; rows
// outside the image are a shared zero row.  The row kernel is register-blocked over WB output
// pixels of one channel block: each weight vector loaded serves WB pixels, and the inputs are
// FMA memory operands.  It is compiled three times (AVX-512, AVX2+FMA, the baseline) and one is
// picked at run time (__builtin_cpu_supports; DLKUNET_CPU_ISA=generic|avx2|avx512 narrows the
// choice, for tests); other architectures get the portable version (GCC/Clang vector extensions).
#include "common.h"

#include <cstdlib>
#include <string>

#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dlkunet {
namespace cpu {

namespace {

#define DLK_INLINE inline __attribute__((always_inline))

// A channel block is kBlock / L vectors of L floats; L is the instruction set's native width
// (8 on AVX2, 16 on AVX-512, 4 elsewhere), so every vector is one register.  A wider GCC vector
// type than the target's registers is split by the compiler through the stack.
template <int L>
struct Lanes {
  typedef float vec __attribute__((vector_size(L * sizeof(float))));
  static constexpr int kPerBlock = kBlock / L;
  static DLK_INLINE vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof(v)); return v; }
  static DLK_INLINE void store(float* p, const vec& v) { std::memcpy(p, &v, sizeof(v)); }
  // acc += *p * w, with *p as the FMA's memory operand.  Written as one instruction on x86:
  // compiled from C, GCC keeps the inputs that neighbouring taps share in registers and spills
  // the accumulators instead, which halved the kernel's speed (measured).
  static DLK_INLINE void fma_mem(vec& acc, const vec& w, const float* p) {
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (L == 8 || L == 16) {
      typedef float unaligned __attribute__((vector_size(L * sizeof(float)), aligned(alignof(float))));
      asm("vfmadd231ps %2, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const unaligned*>(p)));
      return;
    }
#endif
    acc += load(p) * w;
  }
};

// Output pixels [w, w + WB) of one channel block: out[(w + q) * os] = bias + sum over taps.
// rows[t] is the padded input row of kernel row wrows[t]; output pixel w reads padded pixels
// w + j * dil, j < k.  K / DIL of 0: the runtime k / dil.  The WB x kPerBlock accumulators and one
// weight vector are all the registers the loop needs; inputs are FMA memory operands.
template <int L, int K, int DIL, int WB>
DLK_INLINE void pixels(const float* const* rows, const int* wrows, int nrows, const float* wt, const float* bias,
                       int64_t k, int64_t dil, int64_t w, float* out, int64_t os) {
  using V = Lanes<L>;
  constexpr int NV = V::kPerBlock;
  const int64_t kk = K ? K : k, dd = DIL ? DIL : dil;
  typename V::vec a[WB][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const typename V::vec b = V::load(bias + v * L);
#pragma GCC unroll 32
    for (int q = 0; q < WB; ++q) a[q][v] = b;
  }
  for (int t = 0; t < nrows; ++t) {
    const float* src = rows[t] + w * kBlock;
    const float* wr = wt + wrows[t] * kk * kBlock;
    // Opaque to the optimiser, so that every input address is src plus a constant; otherwise GCC
    // hoists the (w * kBlock + constant) offsets out of the tap loop and spills them.
    asm("" : "+r"(src), "+r"(wr));
#pragma GCC unroll 8
    for (int64_t j = 0; j < kk; ++j) {
      const float* p = src + j * dd * kBlock;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const typename V::vec wv = V::load(wr + j * kBlock + v * L);
#pragma GCC unroll 32
        for (int q = 0; q < WB; ++q) V::fma_mem(a[q][v], wv, p + q * kBlock + v * L);
      }
    }
  }
#pragma GCC unroll 32
  for (int q = 0; q < WB; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) V::store(out + (w + q) * os + v * L, a[q][v]);
}

// A row: full blocks of WB pixels, then the remainder as one block of its own size.
template <int L, int K, int DIL, int WB>
DLK_INLINE void row_kd(const float* const* rows, const int* wrows, int nrows, const float* wt, const float* bias,
                       int64_t k, int64_t dil, int64_t W, float* out, int64_t os) {
  int64_t w = 0;
  for (; w + WB <= W; w += WB) pixels<L, K, DIL, WB>(rows, wrows, nrows, wt, bias, k, dil, w, out, os);
  if constexpr (WB > 1) {
    if (W - w >= WB / 2) {
      pixels<L, K, DIL, WB / 2>(rows, wrows, nrows, wt, bias, k, dil, w, out, os);
      w += WB / 2;
    }
  }
  for (; w < W; ++w) pixels<L, K, DIL, 1>(rows, wrows, nrows, wt, bias, k, dil, w, out, os);
}

// The shipped kernel sizes get their own unrolled code; any other runs the generic loop.
template <int L, int WB>
DLK_INLINE void row_any(const float* const* rows, const int* wrows, int nrows, const float* wt, const float* bias,
                        int64_t k, int64_t dil, int64_t W, float* out, int64_t os) {
#define DLK_CASE(KK, DD)                                                              \
  if (k == KK && dil == DD) {                                                         \
    row_kd<L, KK, DD, WB>(rows, wrows, nrows, wt, bias, k, dil, W, out, os);          \
    return;                                                                           \
  }
  DLK_CASE(3, 1) DLK_CASE(5, 1) DLK_CASE(7, 1) DLK_CASE(7, 3) DLK_CASE(5, 3) DLK_CASE(3, 3)
#undef DLK_CASE
  row_kd<L, 0, 0, WB>(rows, wrows, nrows, wt, bias, k, dil, W, out, os);
}

using RowFn = void (*)(const float* const*, const int*, int, const float*, const float*, int64_t, int64_t, int64_t,
                       float*, int64_t);

// Pixels per register block: the accumulators (WB * kBlock / L of them) plus a weight vector fit
// the register file: 16 ymm on AVX2 (7 x 2 + 1), 32 zmm on AVX-512 (14 + 1); 7 also divides every
// DLKUNet width at 224 x 224 (224 / 2^k).
constexpr int kPixelsAvx512 = 14, kPixelsAvx2 = 7, kPixelsGeneric = 3;
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64-v4"))) void row_avx512(const float* const* rows, const int* wrows, int nrows,
                                                          const float* wt, const float* bias, int64_t k, int64_t dil,
                                                          int64_t W, float* out, int64_t os) {
  row_any<16, kPixelsAvx512>(rows, wrows, nrows, wt, bias, k, dil, W, out, os);
}
__attribute__((target("arch=x86-64-v3"))) void row_avx2(const float* const* rows, const int* wrows, int nrows,
                                                        const float* wt, const float* bias, int64_t k, int64_t dil,
                                                        int64_t W, float* out, int64_t os) {
  row_any<8, kPixelsAvx2>(rows, wrows, nrows, wt, bias, k, dil, W, out, os);
}
#endif
void row_generic(const float* const* rows, const int* wrows, int nrows, const float* wt, const float* bias, int64_t k,
                 int64_t dil, int64_t W, float* out, int64_t os) {
  row_any<4, kPixelsGeneric>(rows, wrows, nrows, wt, bias, k, dil, W, out, os);
}

struct Isa {
  RowFn row;
  const char* name;
};

Isa pick_isa() {
  const char* env = std::getenv("DLKUNET_CPU_ISA");
  const std::string want = env ? env : "";
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "avx512")) return {row_avx512, "avx512"};
  if (avx2 && (want.empty() || want == "avx512" || want == "avx2")) return {row_avx2, "avx2"};
#endif
  return {row_generic, "generic"};
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

}  // namespace

const char* blocked_isa() { return isa().name; }

bool blocked_disabled() {
  const char* env = std::getenv("DLKUNET_CPU_BLOCKED");
  return env && env[0] == '0';
}

void dw_row_blocked(const float* const* rows, const int* wrows, int nrows, const float* wt, const float* bias,
                    int64_t k, int64_t dil, int64_t W, float* out, int64_t os) {
  isa().row(rows, wrows, nrows, wt, bias, k, dil, W, out, os);
}

void pack_row_blocked(const float* src, int64_t W, int64_t C, int64_t cb, int64_t pad, float* dst) {
  const int64_t c0 = cb * kBlock, n = std::min<int64_t>(kBlock, C - c0);
  std::fill(dst, dst + pad * kBlock, 0.f);
  float* d = dst + pad * kBlock;
  const float* s = src + c0;
  if (n == kBlock) {
    for (int64_t w = 0; w < W; ++w) std::memcpy(d + w * kBlock, s + w * C, kBlock * sizeof(float));
  } else {
    for (int64_t w = 0; w < W; ++w) {
      std::memcpy(d + w * kBlock, s + w * C, n * sizeof(float));
      std::fill(d + w * kBlock + n, d + (w + 1) * kBlock, 0.f);
    }
  }
  std::fill(d + W * kBlock, d + (W + pad) * kBlock, 0.f);
}

// One allocation and a loop each: these run on every call, and as chains of ATen ops (zeros,
// narrow, copy, permute, contiguous) they cost more than the copy itself at the deep levels'
// small maps.
Tensor block_taps(const Tensor& w) {
  const int64_t C = w.size(0), kk = w.size(2) * w.size(3), nb = (C + kBlock - 1) / kBlock;
  const Tensor src = w.to(at::kFloat).contiguous();
  Tensor t = at::empty({nb, kk, kBlock}, src.options());
  const float* s = src.data_ptr<float>();
  float* d = t.data_ptr<float>();
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < kk; ++j)
      for (int64_t i = 0; i < kBlock; ++i) {
        const int64_t c = b * kBlock + i;
        d[(b * kk + j) * kBlock + i] = c < C ? s[c * kk + j] : 0.f;
      }
  return t;
}

Tensor block_bias(const Tensor& b) {
  const int64_t C = b.size(0), nb = (C + kBlock - 1) / kBlock;
  const Tensor src = b.to(at::kFloat).contiguous();
  Tensor t = at::empty({nb * kBlock}, src.options());
  const float* s = src.data_ptr<float>();
  float* d = t.data_ptr<float>();
  for (int64_t c = 0; c < nb * kBlock; ++c) d[c] = c < C ? s[c] : 0.f;
  return t;
}

void dw_rows_blocked(const float* img, int64_t H, int64_t W, int64_t C, int64_t r0, int64_t r1, int64_t cb0,
                     int64_t cb1, const float* wtb, const float* bb, int64_t k, int64_t dil, float* out, int64_t ldo) {
  thread_local AlignedVector<float> scratch;  // kept between calls, as scratch.cpp's buffers
  const int64_t pad = dil * (k - 1) / 2, Wp = W + 2 * pad;
  const int64_t lo = std::max<int64_t>(0, r0 - pad), hi = std::min(H, r1 + pad), n = hi - lo;
  if (static_cast<int64_t>(scratch.size()) < n * Wp * kBlock) scratch.resize(n * Wp * kBlock);
  const float* rows[kMaxKernel];
  int wrows[kMaxKernel];
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    for (int64_t r = lo; r < hi; ++r) pack_row_blocked(img + r * W * C, W, C, cb, pad, scratch.data() + (r - lo) * Wp * kBlock);
    for (int64_t r = r0; r < r1; ++r) {
      int nrows = 0;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t ih = r + i * dil - pad;
        if (ih < 0 || ih >= H) continue;
        rows[nrows] = scratch.data() + (ih - lo) * Wp * kBlock;
        wrows[nrows++] = static_cast<int>(i);
      }
      dw_row_blocked(rows, wrows, nrows, wtb + cb * k * k * kBlock, bb + cb * kBlock, k, dil, W,
                     out + (r - r0) * W * ldo + cb * kBlock, ldo);
    }
  }
}

Tensor depthwise_forward(const Tensor& x, const Tensor& w, const Tensor& b, int64_t dilation) {
  const char* op = "cpu_depthwise_forward";
  check_x(op, "x", x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t k = check_depthwise(op, "w", w, C);
  check_shape(op, "b", b, {C});
  DLK_CHECK(dilation >= 1, op, " dilation ", dilation);
  c10::NoGradGuard no_grad;
  Tensor X = to_nhwc(x, at::kFloat, Slot::kInput), wb = block_taps(w), bb = block_bias(b);
  const int64_t ld = blocks_of(C) * kBlock, nb = blocks_of(C);
  Tensor out = at::empty({N, H, W, ld}, X.options());
  const float *Xp = X.data_ptr<float>(), *wp = wb.data_ptr<float>(), *bp = bb.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  // Tasks of (image, channel block, block of rows): whole images when that occupies the threads,
  // since each block of rows packs its halo of 2 * pad rows again.
  const int64_t want = 2 * at::get_num_threads(), split = std::min(H, (want + N * nb - 1) / (N * nb));
  const int64_t rows = (H + split - 1) / split, rb = (H + rows - 1) / rows;
  at::parallel_for(0, N * rb * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (rb * nb), r0 = t / nb % rb * rows, cb = t % nb, r1 = std::min(H, r0 + rows);
      dw_rows_blocked(Xp + n * H * W * C, H, W, C, r0, r1, cb, cb + 1, wp, bp, k, dilation,
                      op_ + (n * H + r0) * W * ld, ld);
    }
  });
  return out.narrow(3, 0, C).permute({0, 3, 1, 2});
}

}  // namespace cpu
}  // namespace dlkunet
