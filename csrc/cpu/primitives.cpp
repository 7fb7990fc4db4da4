// The ISA-cloned inner loops of the CPU kernels: depthwise rows (forward and weight gradient) and the
// elementwise passes (BatchNorm/ReLU epilogues and backward, the LKA gate).
//
// setup.py builds with no ISA flags, so a loop compiled normally would use SSE2 only; each function
// here is cloned for AVX-512, AVX2 and the baseline (target_clones) and picked once at load time.
// The elementwise loops are written branch-free over restrict pointers so GCC vectorises them; a
// conditional load (`relu ? g : 0` as an if) would stop that, which made them 40% of the backward.
#include "common.h"

#include <limits>

// -std=c++17 turns floating-point contraction off; the depthwise taps want FMA.
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dlkunet {
namespace cpu {

namespace {

typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };

#define DLK_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DLK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DLK_CLONES
#endif

template <typename V, typename T> DLK_INLINE V vload(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V, typename T> DLK_INLINE void vstore(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// Output pixel w of row h, channels [c0, c1), any position: taps outside the image are skipped.
// rows[0, nrows) are the kernel rows i whose input row lies inside the image.
template <typename T>
DLK_INLINE void dw_pixel(const T* in, int64_t W, int64_t C, int64_t h, const T* wt, const T* bias, int64_t k,
                         int64_t dil, int64_t pad, const int64_t* rows, int64_t nrows, int64_t w, int64_t c0,
                         int64_t c1, T* out, bool accumulate) {
  using V = typename VecOf<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  // Taps j whose column w + j*dil - pad lies inside the image.
  const int64_t jlo = w >= pad ? 0 : (pad - w + dil - 1) / dil;
  const int64_t jhi = std::min(k, (W - 1 - w + pad) / dil + 1);
  T* o = out + w * C;
  int64_t c = c0;
  for (; c + 4 * L <= c1; c += 4 * L) {  // four independent FMA chains hide the FMA latency
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    if (bias) {
      a0 = vload<V>(bias + c); a1 = vload<V>(bias + c + L);
      a2 = vload<V>(bias + c + 2 * L); a3 = vload<V>(bias + c + 3 * L);
    }
    for (int64_t t = 0; t < nrows; ++t) {
      const int64_t i = rows[t];
      const T* src = in + (h + i * dil - pad) * W * C + c;
      const T* wr = wt + i * k * C + c;
      for (int64_t j = jlo; j < jhi; ++j) {
        const T* p = src + (w + j * dil - pad) * C;
        const T* q = wr + j * C;
        a0 += vload<V>(p) * vload<V>(q);
        a1 += vload<V>(p + L) * vload<V>(q + L);
        a2 += vload<V>(p + 2 * L) * vload<V>(q + 2 * L);
        a3 += vload<V>(p + 3 * L) * vload<V>(q + 3 * L);
      }
    }
    if (accumulate) {
      a0 += vload<V>(o + c); a1 += vload<V>(o + c + L);
      a2 += vload<V>(o + c + 2 * L); a3 += vload<V>(o + c + 3 * L);
    }
    vstore(o + c, a0); vstore(o + c + L, a1); vstore(o + c + 2 * L, a2); vstore(o + c + 3 * L, a3);
  }
  for (; c + L <= c1; c += L) {
    V a = bias ? vload<V>(bias + c) : V{};
    for (int64_t t = 0; t < nrows; ++t) {
      const int64_t i = rows[t];
      const T* src = in + (h + i * dil - pad) * W * C + c;
      const T* wr = wt + i * k * C + c;
      for (int64_t j = jlo; j < jhi; ++j) a += vload<V>(src + (w + j * dil - pad) * C) * vload<V>(wr + j * C);
    }
    if (accumulate) a += vload<V>(o + c);
    vstore(o + c, a);
  }
  for (; c < c1; ++c) {
    T a = bias ? bias[c] : T(0);
    for (int64_t t = 0; t < nrows; ++t) {
      const int64_t i = rows[t];
      const T* src = in + (h + i * dil - pad) * W * C + c;
      const T* wr = wt + i * k * C + c;
      for (int64_t j = jlo; j < jhi; ++j) a += src[(w + j * dil - pad) * C] * wr[j * C];
    }
    o[c] = accumulate ? o[c] + a : a;
  }
}

template <typename T>
DLK_INLINE void dw_row_impl(const T* in, int64_t H, int64_t W, int64_t C, int64_t h, const T* wt, const T* bias,
                            int64_t k, int64_t dil, T* out, bool accumulate, int64_t c0, int64_t c1) {
  using V = typename VecOf<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  constexpr int64_t WB = 4;  // pixels per weight load; 4 accumulators + 1 weight fit AVX2's 16 registers
  const int64_t pad = dil * (k - 1) / 2;
  if (c1 < 0) c1 = C;
  int64_t rows[kMaxKernel];
  int64_t nrows = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t ih = h + i * dil - pad;
    if (ih >= 0 && ih < H) rows[nrows++] = i;
  }
  // Interior pixels [lo, hi) have every tap inside the image.  They go WB at a time, one channel
  // vector at a time: each weight vector loaded serves WB pixels (1.25 loads per FMA instead of
  // 2; the per-pixel loop is load-bound), and the block's inputs stay in L1 across channels.
  const int64_t lo = std::min(W, pad), hi = std::max(lo, W - pad);
  int64_t w = 0;
  for (; w < lo; ++w) dw_pixel(in, W, C, h, wt, bias, k, dil, pad, rows, nrows, w, c0, c1, out, accumulate);
  for (; w + WB <= hi; w += WB) {
    int64_t c = c0;
    for (; c + L <= c1; c += L) {
      const V init = bias ? vload<V>(bias + c) : V{};
      V a[WB];
      for (int64_t b = 0; b < WB; ++b) a[b] = init;
      for (int64_t t = 0; t < nrows; ++t) {
        const int64_t i = rows[t];
        const T* src = in + ((h + i * dil - pad) * W + w - pad) * C + c;
        const T* wr = wt + i * k * C + c;
        // The next block's new pixels in this row: the hardware prefetchers miss this strided
        // stream (one line per pixel, C apart), and the FMAs stalled on it.
        for (int64_t b = 0; b < WB; ++b) __builtin_prefetch(src + ((k - 1) * dil + 2 * WB + b) * C);
        for (int64_t j = 0; j < k; ++j) {
          const V wv = vload<V>(wr + j * C);
          const T* p = src + j * dil * C;
          for (int64_t b = 0; b < WB; ++b) a[b] += vload<V>(p + b * C) * wv;
        }
      }
      for (int64_t b = 0; b < WB; ++b) {
        T* o = out + (w + b) * C + c;
        vstore(o, accumulate ? a[b] + vload<V>(o) : a[b]);
      }
    }
    if (c < c1)
      for (int64_t b = 0; b < WB; ++b)
        dw_pixel(in, W, C, h, wt, bias, k, dil, pad, rows, nrows, w + b, c, c1, out, accumulate);
  }
  for (; w < W; ++w) dw_pixel(in, W, C, h, wt, bias, k, dil, pad, rows, nrows, w, c0, c1, out, accumulate);
}

template <typename T>
DLK_INLINE void dw_wgrad_row_impl(const T* dout, const T* in, int64_t H, int64_t W, int64_t C, int64_t h, int64_t k,
                                  int64_t dil, T* gw, T* gb) {
  using V = typename VecOf<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t pad = dil * (k - 1) / 2;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t ih = h + i * dil - pad;
    if (ih < 0 || ih >= H) continue;
    const T* src = in + ih * W * C;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t off = j * dil - pad;
      const int64_t wlo = std::max<int64_t>(0, -off), whi = std::min(W, W - off);
      T* g = gw + (i * k + j) * C;
      int64_t c = 0;
      for (; c + 4 * L <= C; c += 4 * L) {
        V a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t w = wlo; w < whi; ++w) {
          const T* d = dout + w * C + c;
          const T* p = src + (w + off) * C + c;
          a0 += vload<V>(d) * vload<V>(p);
          a1 += vload<V>(d + L) * vload<V>(p + L);
          a2 += vload<V>(d + 2 * L) * vload<V>(p + 2 * L);
          a3 += vload<V>(d + 3 * L) * vload<V>(p + 3 * L);
        }
        vstore(g + c, vload<V>(g + c) + a0);
        vstore(g + c + L, vload<V>(g + c + L) + a1);
        vstore(g + c + 2 * L, vload<V>(g + c + 2 * L) + a2);
        vstore(g + c + 3 * L, vload<V>(g + c + 3 * L) + a3);
      }
      for (; c + L <= C; c += L) {
        V a = {};
        for (int64_t w = wlo; w < whi; ++w) a += vload<V>(dout + w * C + c) * vload<V>(src + (w + off) * C + c);
        vstore(g + c, vload<V>(g + c) + a);
      }
      for (; c < C; ++c) {
        T a = 0;
        for (int64_t w = wlo; w < whi; ++w) a += dout[w * C + c] * src[(w + off) * C + c];
        g[c] += a;
      }
    }
  }
  if (gb) {
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = 0; c < C; ++c) gb[c] += dout[w * C + c];
  }
}

}  // namespace

DLK_CLONES void dw_row(const float* in, int64_t H, int64_t W, int64_t C, int64_t h, const float* wt,
                       const float* bias, int64_t k, int64_t dil, float* out, bool accumulate, int64_t c0,
                       int64_t c1) {
  dw_row_impl<float>(in, H, W, C, h, wt, bias, k, dil, out, accumulate, c0, c1);
}
DLK_CLONES void dw_row(const double* in, int64_t H, int64_t W, int64_t C, int64_t h, const double* wt,
                       const double* bias, int64_t k, int64_t dil, double* out, bool accumulate, int64_t c0,
                       int64_t c1) {
  dw_row_impl<double>(in, H, W, C, h, wt, bias, k, dil, out, accumulate, c0, c1);
}
DLK_CLONES void dw_wgrad_row(const float* dout, const float* in, int64_t H, int64_t W, int64_t C, int64_t h,
                             int64_t k, int64_t dil, float* gw, float* gb) {
  dw_wgrad_row_impl<float>(dout, in, H, W, C, h, k, dil, gw, gb);
}
DLK_CLONES void dw_wgrad_row(const double* dout, const double* in, int64_t H, int64_t W, int64_t C, int64_t h,
                             int64_t k, int64_t dil, double* gw, double* gb) {
  dw_wgrad_row_impl<double>(dout, in, H, W, C, h, k, dil, gw, gb);
}

namespace {

// dst[r, c] = act(src[r, c] * a + b), with (a, b) per column (per_col) or per row; a == nullptr: 1.
template <typename T>
DLK_INLINE void affine_act_impl(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t R, int64_t Cn, const T* a,
                                const T* b, bool per_col, bool relu) {
  const T lo = relu ? T(0) : -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    const T* s = src + r * lds;
    T* d = dst + r * ldd;
    if (per_col && a) {
      for (int64_t c = 0; c < Cn; ++c) d[c] = std::max(s[c] * a[c] + b[c], lo);
    } else if (per_col) {
      for (int64_t c = 0; c < Cn; ++c) d[c] = std::max(s[c] + b[c], lo);
    } else {
      const T ar = a ? a[r] : T(1), br = b[r];
      for (int64_t c = 0; c < Cn; ++c) d[c] = std::max(s[c] * ar + br, lo);
    }
  }
}

// Adds bias in place, then the exact two-pass mean and M2 of each channel of the block.
template <typename T>
DLK_INLINE void bias_moments_impl(T* Z, int64_t ldz, int64_t R, int64_t Cn, const T* bias, bool per_col, T* mean,
                                  T* m2) {
  if (per_col) {
    for (int64_t c = 0; c < Cn; ++c) mean[c] = m2[c] = T(0);
    for (int64_t r = 0; r < R; ++r) {
      T* z = Z + r * ldz;
      for (int64_t c = 0; c < Cn; ++c) { z[c] += bias[c]; mean[c] += z[c]; }
    }
    for (int64_t c = 0; c < Cn; ++c) mean[c] /= T(R);
    for (int64_t r = 0; r < R; ++r) {
      const T* z = Z + r * ldz;
      for (int64_t c = 0; c < Cn; ++c) { const T d = z[c] - mean[c]; m2[c] += d * d; }
    }
  } else {
    for (int64_t r = 0; r < R; ++r) {
      T* z = Z + r * ldz;
      T acc = 0;
      for (int64_t c = 0; c < Cn; ++c) { z[c] += bias[r]; acc += z[c]; }
      const T mu = acc / T(Cn);
      T q = 0;
      for (int64_t c = 0; c < Cn; ++c) { const T d = z[c] - mu; q += d * d; }
      mean[r] = mu; m2[r] = q;
    }
  }
}

template <typename T, bool TRAINING, bool RELU, bool WRITE>
DLK_INLINE void bn_act_backward_impl(T* __restrict Z, const T* __restrict G, int64_t P, int64_t Cout,
                                     const BnActBackwardCoef<T>& k, T* __restrict sg, T* __restrict sgx,
                                     T* __restrict sdz) {
  const T* __restrict shift = k.shift;
  const T* __restrict invstd = k.invstd;
  const T* __restrict gamma = k.gamma;
  const T* __restrict beta = k.beta;
  const T* __restrict sc = k.scale;
  const T* __restrict mg = k.mean_g;
  const T* __restrict mgx = k.mean_gx;
  for (int64_t p = 0; p < P; ++p) {
    T* __restrict z = Z + p * Cout;
    const T* __restrict gy = G + p * Cout;
    for (int64_t o = 0; o < Cout; ++o) {
      const T xh = (z[o] + shift[o]) * invstd[o];
      const T g = gy[o];  // loaded unconditionally: a conditional load blocks vectorisation
      const T gv = (!RELU || xh * gamma[o] + beta[o] > T(0)) ? g : T(0);
      sg[o] += gv;
      sgx[o] += gv * xh;
      if (WRITE) {
        const T dz = TRAINING ? sc[o] * (gv - mg[o] - xh * mgx[o]) : sc[o] * gv;
        if (!TRAINING) sdz[o] += dz;
        z[o] = dz;
      }
    }
  }
}

template <typename T>
DLK_INLINE void bn_act_backward_switch(T* Z, const T* G, int64_t P, int64_t Cout, const BnActBackwardCoef<T>& k,
                                       bool training, bool relu, bool write, T* sg, T* sgx, T* sdz) {
#define DLK_BN_BWD(TR, RE, WR)                       \
  if (training == TR && relu == RE && write == WR) \
    return bn_act_backward_impl<T, TR, RE, WR>(Z, G, P, Cout, k, sg, sgx, sdz);
  DLK_BN_BWD(true, true, true) DLK_BN_BWD(true, true, false) DLK_BN_BWD(true, false, true)
  DLK_BN_BWD(true, false, false) DLK_BN_BWD(false, true, true) DLK_BN_BWD(false, true, false)
  DLK_BN_BWD(false, false, true) DLK_BN_BWD(false, false, false)
#undef DLK_BN_BWD
}

// dst[r, c] = x[r, c] * (O[r, c] + b1), b1 per column (per_col) or per row.
template <typename T>
DLK_INLINE void gate_impl(T* dst, int64_t ldd, const T* x, int64_t ldx, const T* O, int64_t ldo, int64_t R,
                          int64_t Cn, const T* b1, bool per_col) {
  for (int64_t r = 0; r < R; ++r) {
    T* __restrict d = dst + r * ldd;
    const T* __restrict xs = x + r * ldx;
    const T* __restrict o = O + r * ldo;
    if (per_col) {
      for (int64_t c = 0; c < Cn; ++c) d[c] = xs[c] * (o[c] + b1[c]);
    } else {
      const T br = b1[r];
      for (int64_t c = 0; c < Cn; ++c) d[c] = xs[c] * (o[c] + br);
    }
  }
}

template <typename T>
DLK_INLINE void gate_backward_impl(const T* G, const T* X, T* O, const T* b1, T* GX, int64_t P, int64_t C, T* gb) {
  for (int64_t p = 0; p < P; ++p) {
    const T* __restrict g = G + p * C;
    const T* __restrict xv = X + p * C;
    T* __restrict o = O + p * C;
    T* __restrict gx = GX + p * C;
    for (int64_t c = 0; c < C; ++c) {
      gx[c] = g[c] * (o[c] + b1[c]);
      const T dattn = g[c] * xv[c];
      o[c] = dattn;
      gb[c] += dattn;
    }
  }
}

}  // namespace

#define DLK_FOR_FLOAT_AND_DOUBLE(DEFINE) DEFINE(float) DEFINE(double)

#define DLK_DEFINE(T)                                                                                           \
  DLK_CLONES void affine_act(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t R, int64_t Cn, const T* a,  \
                             const T* b, bool per_col, bool relu) {                                              \
    affine_act_impl<T>(dst, ldd, src, lds, R, Cn, a, b, per_col, relu);                                          \
  }                                                                                                              \
  DLK_CLONES void bias_moments(T* Z, int64_t ldz, int64_t R, int64_t Cn, const T* bias, bool per_col, T* mean,   \
                               T* m2) {                                                                          \
    bias_moments_impl<T>(Z, ldz, R, Cn, bias, per_col, mean, m2);                                                \
  }                                                                                                              \
  DLK_CLONES void bn_act_backward(T* Z, const T* G, int64_t P, int64_t Cout, const BnActBackwardCoef<T>& k,      \
                                  bool training, bool relu, bool write, T* sg, T* sgx, T* sdz) {                 \
    bn_act_backward_switch<T>(Z, G, P, Cout, k, training, relu, write, sg, sgx, sdz);                            \
  }                                                                                                              \
  DLK_CLONES void gate(T* dst, int64_t ldd, const T* x, int64_t ldx, const T* O, int64_t ldo, int64_t R,         \
                       int64_t Cn, const T* b1, bool per_col) {                                                  \
    gate_impl<T>(dst, ldd, x, ldx, O, ldo, R, Cn, b1, per_col);                                                  \
  }                                                                                                              \
  DLK_CLONES void gate_backward(const T* G, const T* X, T* O, const T* b1, T* GX, int64_t P, int64_t C, T* gb) { \
    gate_backward_impl<T>(G, X, O, b1, GX, P, C, gb);                                                            \
  }
DLK_FOR_FLOAT_AND_DOUBLE(DLK_DEFINE)
#undef DLK_DEFINE


namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// d[j * ldd + i] = s[i * lds + j] for an 8 x 8 block: three rounds of two-input shuffles
// (pairs of elements, pairs of pairs, 128-bit halves), the classic AVX transpose.
DLK_INLINE void transpose8x8(const float* s, int64_t lds, float* d, int64_t ldd) {
  v8f r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = vload<v8f>(s + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], (v8i){0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], (v8i){2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], (v8i){0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], (v8i){2, 3, 10, 11, 6, 7, 14, 15});
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], (v8i){0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], (v8i){2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int j = 0; j < 4; ++j) {
    vstore(d + j * ldd, __builtin_shuffle(u[j], u[j + 4], (v8i){0, 1, 2, 3, 8, 9, 10, 11}));
    vstore(d + (j + 4) * ldd, __builtin_shuffle(u[j], u[j + 4], (v8i){4, 5, 6, 7, 12, 13, 14, 15}));
  }
}

}  // namespace

DLK_CLONES void transpose_f32(const float* src, float* dst, int64_t R, int64_t P, int64_t r0, int64_t r1,
                              int64_t p0, int64_t p1) {
  const int64_t r8 = r0 + (r1 - r0) / 8 * 8, p8 = p0 + (p1 - p0) / 8 * 8;
  for (int64_t r = r0; r < r8; r += 8)
    for (int64_t p = p0; p < p8; p += 8) transpose8x8(src + r * P + p, P, dst + p * R + r, R);
  // The ragged edges, element by element.
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t r = (p < p8 ? r8 : r0); r < r1; ++r) dst[p * R + r] = src[r * P + p];
}

}  // namespace cpu
}  // namespace dlkunet
