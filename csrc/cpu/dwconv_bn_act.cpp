// Fused depthwise conv -> pointwise conv -> BatchNorm -> ReLU on the CPU (forward and backward),
// plus the depthwise row primitives that lka_gate.cpp shares.
//
// Work unit: a tile of whole image rows of one sample.  The depthwise output of a tile (pixels x Cin)
// is written to a thread-local buffer that stays in L2 while the pointwise GEMM consumes it, so the
// intermediate never goes to memory.  In eval mode BatchNorm and both biases fold into the GEMM's
// weights and a bias; the output is written once.  Training needs the batch statistics before it
// can normalise: pass 1 writes z and per-tile (mean, M2), which merge exactly (Chan et al.) in
// double, and pass 2 normalises in place.
#include "common.h"

#include <cmath>
#include <type_traits>

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

template <typename T>
DLK_INLINE void dw_row_impl(const T* in, int64_t H, int64_t W, int64_t C, int64_t h, const T* wt, const T* bias,
                            int64_t k, int64_t dil, T* out, bool accumulate) {
  using V = typename VecOf<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t pad = dil * (k - 1) / 2;
  int64_t rows[kMaxKernel];
  int64_t nrows = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t ih = h + i * dil - pad;
    if (ih >= 0 && ih < H) rows[nrows++] = i;
  }
  for (int64_t w = 0; w < W; ++w) {
    // Taps j whose column w + j*dil - pad lies inside the image.
    const int64_t jlo = w >= pad ? 0 : (pad - w + dil - 1) / dil;
    const int64_t jhi = std::min(k, (W - 1 - w + pad) / dil + 1);
    T* o = out + w * C;
    int64_t c = 0;
    for (; c + 4 * L <= C; c += 4 * L) {  // four independent FMA chains hide the FMA latency
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
    for (; c + L <= C; c += L) {
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
    for (; c < C; ++c) {
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
                       const float* bias, int64_t k, int64_t dil, float* out, bool accumulate) {
  dw_row_impl<float>(in, H, W, C, h, wt, bias, k, dil, out, accumulate);
}
DLK_CLONES void dw_row(const double* in, int64_t H, int64_t W, int64_t C, int64_t h, const double* wt,
                       const double* bias, int64_t k, int64_t dil, double* out, bool accumulate) {
  dw_row_impl<double>(in, H, W, C, h, wt, bias, k, dil, out, accumulate);
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

const char* kFwd = "cpu_dwconv_bn_act_forward";
const char* kBwd = "cpu_dwconv_bn_act_backward";

struct Shapes {
  int64_t N, Cin, H, W, Cout, k;
};

Shapes check_common(const char* op, const Tensor& x, const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pw,
                    const Tensor& b_pw, const Tensor& gamma, const Tensor& beta, const Tensor& m, const Tensor& v,
                    const char* mname, const char* vname, double eps) {
  check_x(op, "x", x);
  Shapes s{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0};
  s.k = check_depthwise(op, "w_dw", w_dw, x);
  check_like_x(op, "b_dw", b_dw, x, {s.Cin}, false);
  check_cpu_float(op, "w_pw", w_pw);
  TORCH_CHECK(w_pw.dim() == 4 && w_pw.size(1) == s.Cin && w_pw.size(2) == 1 && w_pw.size(3) == 1 && w_pw.size(0) >= 1,
              op, ": w_pw must have shape (Cout, ", s.Cin, ", 1, 1) for x with ", s.Cin, " channels, got ",
              w_pw.sizes());
  s.Cout = w_pw.size(0);
  check_like_x(op, "w_pw", w_pw, x, {s.Cout, s.Cin, 1, 1}, false);
  check_like_x(op, "b_pw", b_pw, x, {s.Cout}, false);
  check_like_x(op, "gamma", gamma, x, {s.Cout}, true);
  check_like_x(op, "beta", beta, x, {s.Cout}, true);
  check_like_x(op, mname, m, x, {s.Cout}, true);
  check_like_x(op, vname, v, x, {s.Cout}, true);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite non-negative number, got ", eps);
  return s;
}

// The tile loop shared by forward and backward: calls body(n, r0, r1, tile) per tile, where tile
// (P x Cin, P = (r1 - r0) * W) already holds the depthwise output of rows [r0, r1) of sample n.
template <typename T, typename Body>
void for_each_dw_tile(const T* X, const Shapes& s, const T* wd, const T* bd, int64_t rows, int64_t extra_scratch,
                      const Body& body) {
  const int64_t per_img = (s.H + rows - 1) / rows;
  at::parallel_for(0, s.N * per_img, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    std::vector<T> tile(static_cast<size_t>(rows * s.W * s.Cin + extra_scratch));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / per_img, r0 = (t % per_img) * rows, r1 = std::min(s.H, r0 + rows);
      const T* Xn = X + n * s.H * s.W * s.Cin;
      for (int64_t r = r0; r < r1; ++r)
        dw_row(Xn, s.H, s.W, s.Cin, r, wd, bd, s.k, 1, tile.data() + (r - r0) * s.W * s.Cin, false);
      body(t, n, r0, r1, tile.data(), tile.data() + rows * s.W * s.Cin);
    }
  });
}

// Writes act(O * a + b) (a == nullptr: 1) to dst.  Channel-last: O is P x Cout (ld ldo), dst pixel
// stride Cout; channel-first: O is Cout x P (ld ldo), dst channel stride lddst.
template <typename T, typename out_t>
void epilogue(const T* O, int64_t ldo, out_t* dst, int64_t lddst, int64_t P, int64_t Cout, bool channels_last,
              const T* a, const T* b, bool relu) {
  if (channels_last) {
    for (int64_t p = 0; p < P; ++p) {
      const T* src = O + p * ldo;
      out_t* d = dst + p * lddst;
      for (int64_t o = 0; o < Cout; ++o) {
        T v = (a ? src[o] * a[o] : src[o]) + b[o];
        d[o] = static_cast<out_t>(relu ? std::max(v, T(0)) : v);
      }
    }
  } else {
    for (int64_t o = 0; o < Cout; ++o) {
      const T* src = O + o * ldo;
      out_t* d = dst + o * lddst;
      const T ao = a ? a[o] : T(1), bo = b[o];
      for (int64_t p = 0; p < P; ++p) {
        T v = src[p] * ao + bo;
        d[p] = static_cast<out_t>(relu ? std::max(v, T(0)) : v);
      }
    }
  }
}

// The BatchNorm + ReLU backward of one tile, in place: Z (P x Cout) holds z minus its bias on entry
// and dz on exit (unless !WRITE).  Per channel: shift = b_pw - mean, the centring; sc = gamma *
// invstd; mg, mgx: the batch means of g and g * xhat (training only).  Sums of g, g * xhat and dz
// are added to sg, sgx, sdz.  Templated flags and restrict pointers let the loop vectorise.
template <typename T, bool TRAINING, bool RELU, bool WRITE>
void bn_act_backward_tile(T* __restrict Z, const T* __restrict G, int64_t P, int64_t Cout,
                          const T* __restrict shift, const T* __restrict invstd, const T* __restrict gamma,
                          const T* __restrict beta, const T* __restrict sc, const T* __restrict mg,
                          const T* __restrict mgx, T* __restrict sg, T* __restrict sgx, T* __restrict sdz) {
  for (int64_t p = 0; p < P; ++p) {
    T* __restrict z = Z + p * Cout;
    const T* __restrict gy = G + p * Cout;
    for (int64_t o = 0; o < Cout; ++o) {
      const T xh = (z[o] + shift[o]) * invstd[o];
      const T gv = (RELU && !(xh * gamma[o] + beta[o] > T(0))) ? T(0) : gy[o];
      sg[o] += gv;
      sgx[o] += gv * xh;
      if (WRITE) {
        const T dz = TRAINING ? sc[o] * (gv - mg[o] - xh * mgx[o]) : sc[o] * gv;
        sdz[o] += dz;
        z[o] = dz;
      }
    }
  }
}

template <typename T, bool WRITE>
void bn_act_backward_dispatch(bool training, bool relu, T* Z, const T* G, int64_t P, int64_t Cout, const T* shift,
                              const T* invstd, const T* gamma, const T* beta, const T* sc, const T* mg,
                              const T* mgx, T* sg, T* sgx, T* sdz) {
  if (training && relu) bn_act_backward_tile<T, true, true, WRITE>(Z, G, P, Cout, shift, invstd, gamma, beta, sc, mg, mgx, sg, sgx, sdz);
  else if (training) bn_act_backward_tile<T, true, false, WRITE>(Z, G, P, Cout, shift, invstd, gamma, beta, sc, mg, mgx, sg, sgx, sdz);
  else if (relu) bn_act_backward_tile<T, false, true, WRITE>(Z, G, P, Cout, shift, invstd, gamma, beta, sc, mg, mgx, sg, sgx, sdz);
  else bn_act_backward_tile<T, false, false, WRITE>(Z, G, P, Cout, shift, invstd, gamma, beta, sc, mg, mgx, sg, sgx, sdz);
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                                const Tensor& w_pw, const Tensor& b_pw, const Tensor& gamma,
                                                const Tensor& beta, const Tensor& running_mean,
                                                const Tensor& running_var, bool training, double eps, bool relu,
                                                const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const bool cl = output_format(x) == at::MemoryFormat::ChannelsLast;
  const int64_t HW = s.H * s.W, Cin = s.Cin, Cout = s.Cout;
  Tensor X = to_nhwc(x, ct);
  Tensor wd = taps_major(w_dw, ct, false), bd = b_dw.to(ct).contiguous();
  Tensor Wp = w_pw.reshape({Cout, Cin}).to(ct).contiguous();
  Tensor y = at::empty({s.N, Cout, s.H, s.W}, x.options().memory_format(output_format(x)));
  Tensor g = gamma.to(ct), be = beta.to(ct);
  const int64_t rows = tile_rows(s.H, s.W, Cin + Cout, sizeof(T));
  const T* Xp = X.data_ptr<T>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  constexpr bool direct = std::is_same<scalar_t, T>::value;  // the GEMM can write y itself

  if (!training) {
    Tensor scale = g * at::rsqrt(running_var.to(ct) + eps);
    Tensor Wf = (Wp * scale.unsqueeze(1)).contiguous();
    Tensor bf = ((b_pw.to(ct) - running_mean.to(ct)) * scale + be).contiguous();
    const T* Wfp = Wf.data_ptr<T>();
    const T* bfp = bf.data_ptr<T>();
    for_each_dw_tile<T>(Xp, s, wd.data_ptr<T>(), bd.data_ptr<T>(), rows, direct ? 0 : rows * s.W * Cout,
                        [&](int64_t, int64_t n, int64_t r0, int64_t r1, T* tile, T* scratch) {
      const int64_t P = (r1 - r0) * s.W;
      scalar_t* dst = cl ? yp + (n * HW + r0 * s.W) * Cout : yp + n * Cout * HW + r0 * s.W;
      const int64_t ld = cl ? Cout : HW;
      T* O = direct ? reinterpret_cast<T*>(dst) : scratch;
      const int64_t ldo = direct ? ld : (cl ? Cout : P);
      if (cl) gemm<T>(false, tile, Cin, true, Wfp, Cin, O, ldo, P, Cout, Cin, false);
      else gemm<T>(false, Wfp, Cin, true, tile, Cin, O, ldo, Cout, P, Cin, false);
      epilogue<T, scalar_t>(O, ldo, dst, ld, P, Cout, cl, nullptr, bfp, relu);
    });
    return {y, running_mean.to(ct).clone(), running_var.to(ct).clone()};
  }

  // Training pass 1: z and per-tile mean and M2.  Half types keep z in float until it is
  // normalised: rounding z first would cost digits whenever a channel's std is small next to its mean.
  Tensor zbuf = direct ? y : at::empty(y.sizes(), y.options().dtype(ct).memory_format(output_format(x)));
  T* zp = zbuf.data_ptr<T>();
  const int64_t per_img = (s.H + rows - 1) / rows, ntiles = s.N * per_img;
  std::vector<double> tmean(static_cast<size_t>(ntiles * Cout)), tm2(static_cast<size_t>(ntiles * Cout));
  std::vector<int64_t> tcount(static_cast<size_t>(ntiles));
  Tensor bp = b_pw.to(ct).contiguous();
  const T* Wpp = Wp.data_ptr<T>();
  const T* bpp = bp.data_ptr<T>();
  for_each_dw_tile<T>(Xp, s, wd.data_ptr<T>(), bd.data_ptr<T>(), rows, rows * s.W * Cout + 2 * Cout,
                      [&](int64_t t, int64_t n, int64_t r0, int64_t r1, T* tile, T* scratch) {
    const int64_t P = (r1 - r0) * s.W;
    T* O = scratch;
    T* sum = scratch + rows * s.W * Cout;
    T* m2 = sum + Cout;
    std::fill(sum, sum + 2 * Cout, T(0));
    if (cl) {
      gemm<T>(false, tile, Cin, true, Wpp, Cin, O, Cout, P, Cout, Cin, false);
      for (int64_t p = 0; p < P; ++p) {
        T* z = O + p * Cout;
        for (int64_t o = 0; o < Cout; ++o) { z[o] += bpp[o]; sum[o] += z[o]; }
      }
      for (int64_t o = 0; o < Cout; ++o) sum[o] /= T(P);
      for (int64_t p = 0; p < P; ++p) {
        const T* z = O + p * Cout;
        for (int64_t o = 0; o < Cout; ++o) { T d = z[o] - sum[o]; m2[o] += d * d; }
      }
    } else {
      gemm<T>(false, Wpp, Cin, true, tile, Cin, O, P, Cout, P, Cin, false);
      for (int64_t o = 0; o < Cout; ++o) {
        T* z = O + o * P;
        T acc = 0;
        for (int64_t p = 0; p < P; ++p) { z[p] += bpp[o]; acc += z[p]; }
        const T mu = acc / T(P);
        T q = 0;
        for (int64_t p = 0; p < P; ++p) { T d = z[p] - mu; q += d * d; }
        sum[o] = mu; m2[o] = q;
      }
    }
    for (int64_t o = 0; o < Cout; ++o) { tmean[t * Cout + o] = sum[o]; tm2[t * Cout + o] = m2[o]; }
    tcount[t] = P;
    T* dst = cl ? zp + (n * HW + r0 * s.W) * Cout : zp + n * Cout * HW + r0 * s.W;
    for (int64_t o = 0; o < Cout; ++o) sum[o] = 0;  // reuse as a zero bias
    epilogue<T, T>(O, cl ? Cout : P, dst, cl ? Cout : HW, P, Cout, cl, nullptr, sum, false);
  });

  // Merge tiles in a fixed order: Chan et al.'s pairwise update, in double.
  Tensor mean = at::empty({Cout}, at::TensorOptions().dtype(at::kDouble));
  Tensor var = at::empty({Cout}, at::TensorOptions().dtype(at::kDouble));
  double* mp = mean.data_ptr<double>();
  double* vp = var.data_ptr<double>();
  for (int64_t o = 0; o < Cout; ++o) {
    double cnt = 0, mu = 0, m2 = 0;
    for (int64_t t = 0; t < ntiles; ++t) {
      const double nb = static_cast<double>(tcount[t]), mb = tmean[t * Cout + o];
      const double tot = cnt + nb, delta = mb - mu;
      mu += delta * nb / tot;
      m2 += tm2[t * Cout + o] + delta * delta * cnt * nb / tot;
      cnt = tot;
    }
    mp[o] = mu;
    vp[o] = m2 / cnt;
  }
  // float32 statistics (float64 for float64 inputs), as the reference returns them.
  Tensor mean_out = mean.to(ct), var_out = var.to(ct);

  // Pass 2: normalise, with exactly the statistics the backward will see.
  Tensor scale = (g * at::rsqrt(var_out + eps)).contiguous();
  Tensor shift = (be - mean_out * scale).contiguous();
  const T* ap = scale.data_ptr<T>();
  const T* bq = shift.data_ptr<T>();
  if (cl) {
    at::parallel_for(0, s.N * HW, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        scalar_t* d = yp + p * Cout;
        const T* z = zp + p * Cout;
        for (int64_t o = 0; o < Cout; ++o) {
          T v = z[o] * ap[o] + bq[o];
          d[o] = static_cast<scalar_t>(relu ? std::max(v, T(0)) : v);
        }
      }
    });
  } else {
    at::parallel_for(0, s.N * Cout, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t o = q % Cout;
        scalar_t* d = yp + q * HW;
        const T* z = zp + q * HW;
        const T a = ap[o], b = bq[o];
        for (int64_t p = 0; p < HW; ++p) {
          T v = z[p] * a + b;
          d[p] = static_cast<scalar_t>(relu ? std::max(v, T(0)) : v);
        }
      }
    });
  }
  return {y, mean_out, var_out};
}

template <typename scalar_t>
std::vector<Tensor> backward_impl(const Tensor& grad_y, const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                  const Tensor& w_pw, const Tensor& b_pw, const Tensor& gamma, const Tensor& beta,
                                  const Tensor& mean, const Tensor& var, bool training, double eps, bool relu,
                                  const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const int64_t Cin = s.Cin, Cout = s.Cout, W = s.W, k = s.k;
  Tensor X = to_nhwc(x, ct), G = to_nhwc(grad_y, ct);
  Tensor wd = taps_major(w_dw, ct, false), wdf = taps_major(w_dw, ct, true), bd = b_dw.to(ct).contiguous();
  Tensor Wp = w_pw.reshape({Cout, Cin}).to(ct).contiguous(), bp = b_pw.to(ct).contiguous();
  Tensor invstd = at::rsqrt(var.to(ct) + eps).contiguous();
  Tensor gm = gamma.to(ct).contiguous(), bt = beta.to(ct).contiguous(), mu = mean.to(ct).contiguous();
  Tensor DD = at::empty({s.N, s.H, W, Cin}, X.options());  // d(loss)/d(depthwise output)
  const T *Xp = X.data_ptr<T>(), *Gp = G.data_ptr<T>(), *Wpp = Wp.data_ptr<T>();
  const T *isp = invstd.data_ptr<T>(), *gmp = gm.data_ptr<T>(), *btp = bt.data_ptr<T>();
  T* DDp = DD.data_ptr<T>();
  Tensor shift = (bp - mu).contiguous(), sc = (gm * invstd).contiguous();
  const T *shp = shift.data_ptr<T>(), *scp = sc.data_ptr<T>();
  const int64_t rows = tile_rows(s.H, W, Cin + Cout, sizeof(T));
  const double M = static_cast<double>(s.N * s.H * W);

  // Per tile: Z = tile @ Wp^T is z minus its bias; for each element xhat = (z - mean) * invstd and
  // g = grad_y * relu'(y).  Pass A (training only) sums g and g * xhat for the BatchNorm backward;
  // pass B overwrites Z with dz and takes the pointwise GEMMs' gradients.
  // Training keeps pass A's z for pass B (a transient buffer the size of y): one GEMM fewer.
  ThreadSums<double> sums(2 * Cout);  // sum g, sum g * xhat
  Tensor ZB = training ? at::empty({s.N, s.H, W, Cout}, X.options()) : Tensor();
  T* ZBp = training ? ZB.data_ptr<T>() : nullptr;
  if (training) {
    for_each_dw_tile<T>(Xp, s, wd.data_ptr<T>(), bd.data_ptr<T>(), rows, 2 * Cout,
                        [&](int64_t, int64_t n, int64_t r0, int64_t r1, T* tile, T* scratch) {
      const int64_t P = (r1 - r0) * W;
      T* Z = ZBp + (n * s.H + r0) * W * Cout;
      gemm<T>(false, tile, Cin, true, Wpp, Cin, Z, Cout, P, Cout, Cin, false);
      T* acc = scratch;
      std::fill(acc, acc + 2 * Cout, T(0));
      bn_act_backward_dispatch<T, false>(training, relu, Z, Gp + (n * s.H + r0) * W * Cout, P, Cout, shp, isp,
                                         gmp, btp, scp, nullptr, nullptr, acc, acc + Cout, nullptr);
      double* mine = sums.mine();
      for (int64_t o = 0; o < 2 * Cout; ++o) mine[o] += acc[o];
    });
  }
  std::vector<T> mg(Cout, T(0)), mgx(Cout, T(0));
  if (training) {
    Tensor s1 = sums.total();
    const double* sp = s1.data_ptr<double>();
    for (int64_t o = 0; o < Cout; ++o) { mg[o] = static_cast<T>(sp[o] / M); mgx[o] = static_cast<T>(sp[Cout + o] / M); }
  }

  ThreadSums<T> gwp(Cout * Cin);
  ThreadSums<double> sums2(3 * Cout);  // sum g, sum g * xhat, sum dz
  for_each_dw_tile<T>(Xp, s, wd.data_ptr<T>(), bd.data_ptr<T>(), rows, rows * W * Cout + 3 * Cout,
                      [&](int64_t, int64_t n, int64_t r0, int64_t r1, T* tile, T* scratch) {
    const int64_t P = (r1 - r0) * W;
    T* Z = training ? ZBp + (n * s.H + r0) * W * Cout : scratch;
    if (!training) gemm<T>(false, tile, Cin, true, Wpp, Cin, Z, Cout, P, Cout, Cin, false);
    T* acc = scratch + rows * W * Cout;
    std::fill(acc, acc + 3 * Cout, T(0));
    bn_act_backward_dispatch<T, true>(training, relu, Z, Gp + (n * s.H + r0) * W * Cout, P, Cout, shp, isp, gmp,
                                      btp, scp, mg.data(), mgx.data(), acc, acc + Cout, acc + 2 * Cout);
    double* mine = sums2.mine();
    for (int64_t o = 0; o < 3 * Cout; ++o) mine[o] += acc[o];
    gemm<T>(true, Z, Cout, false, tile, Cin, gwp.mine(), Cin, Cout, Cin, P, true);
    gemm<T>(false, Z, Cout, false, Wpp, Cin, DDp + (n * s.H + r0) * W * Cin, Cin, P, Cin, Cout, false);
  });
  Tensor s2 = sums2.total();

  // Depthwise backward, row by row: grad_x = DD (*) flipped w_dw; grad_w_dw = DD x X.
  Tensor GX = at::empty({s.N, s.H, W, Cin}, X.options());
  ThreadSums<T> gw(k * k * Cin), gb(Cin);
  const T* wdfp = wdf.data_ptr<T>();
  T* GXp = GX.data_ptr<T>();
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / s.H, h = r % s.H;
      const T* DDn = DDp + n * s.H * W * Cin;
      dw_row(DDn, s.H, W, Cin, h, wdfp, static_cast<const T*>(nullptr), k, 1, GXp + r * W * Cin, false);
      dw_wgrad_row(DDn + h * W * Cin, Xp + n * s.H * W * Cin, s.H, W, Cin, h, k, 1, gw.mine(),
                   training ? static_cast<T*>(nullptr) : gb.mine());
    }
  });

  auto dbl = at::TensorOptions().dtype(at::kDouble);
  Tensor g_gamma = s2.narrow(0, Cout, Cout).clone(), g_beta = s2.narrow(0, 0, Cout).clone();
  Tensor g_bpw = training ? at::zeros({Cout}, dbl) : s2.narrow(0, 2 * Cout, Cout).clone();
  Tensor g_bdw = training ? at::zeros({Cin}, dbl) : gb.total();
  Tensor g_wdw = gw.total().reshape({k * k, Cin}).t().reshape({Cin, 1, k, k});
  Tensor g_wpw = gwp.total().reshape({Cout, Cin, 1, 1});
  return {from_nhwc(GX, x),
          g_wdw.to(w_dw.scalar_type()).contiguous(),
          g_bdw.to(b_dw.scalar_type()),
          g_wpw.to(w_pw.scalar_type()).contiguous(),
          g_bpw.to(b_pw.scalar_type()),
          g_gamma.to(gamma.scalar_type()),
          g_beta.to(beta.scalar_type())};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                                          const Tensor& w_pw, const Tensor& b_pw,
                                                          const Tensor& gamma, const Tensor& beta,
                                                          const Tensor& running_mean, const Tensor& running_var,
                                                          bool training, double eps, bool relu) {
  Shapes s = check_common(kFwd, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, "running_mean",
                          "running_var", eps);
  TORCH_CHECK(!training || s.N * s.H * s.W > 1, kFwd,
              ": training-mode batch statistics need more than one value per channel, got x of shape ", x.sizes());
  c10::NoGradGuard no_grad;
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_dwconv_bn_act_forward", [&] {
    out = forward_impl<scalar_t>(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, training, eps,
                                 relu, s);
  });
  return out;
}

std::vector<Tensor> dwconv_bn_act_backward(const Tensor& grad_y, const Tensor& x, const Tensor& w_dw,
                                           const Tensor& b_dw, const Tensor& w_pw, const Tensor& b_pw,
                                           const Tensor& gamma, const Tensor& beta, const Tensor& mean,
                                           const Tensor& var, bool training, double eps, bool relu) {
  Shapes s = check_common(kBwd, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, "mean", "var", eps);
  check_cpu_float(kBwd, "grad_y", grad_y);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({s.N, s.Cout, s.H, s.W}), kBwd, ": grad_y must have shape ",
              at::IntArrayRef({s.N, s.Cout, s.H, s.W}), " (N, Cout, H, W), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), kBwd, ": grad_y has dtype ", grad_y.scalar_type(),
              " but x is ", x.scalar_type());
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_dwconv_bn_act_backward", [&] {
    out = backward_impl<scalar_t>(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, training, eps, relu,
                                  s);
  });
  return out;
}

}  // namespace cpu
}  // namespace dlkunet
