// dwconv_bn_act backward.  z = pw(dw(x)) is recomputed from x (never saved):
//  0. d = dw(x) once, as a plane in x's layout (the three GEMMs below read it);
//  1. recompute z per tile; per-tile sums of g and g * xhat, g = grad_y masked by ReLU;
//  2. per channel (double): grad_beta = sum g, grad_gamma = sum g * xhat, and the coefficients of
//     dz = A * g + B * xhat + C  (eval: A = gamma * rstd; training adds the batch-statistics terms);
//  3. recompute z again and write dz (plane [Cout][P]);
//  4. grad_d = w_pw^T dz (plane [Cin][P] of the input's dtype, as eager rounds it);
//  5. grad_w_pw = dz d^T, split over pixels, summed in double;
//  6. grad_x = depthwise-transposed(grad_d); grad_w_dw, grad_b_dw = pixel sums against x.
// The GEMMs multiply as the forward does (common.cuh, Mma), so z is recomputed bit for bit.  d and dz
// are float32, or 16-bit for 16-bit MMAs, the only readers (PlaneOf): half the bytes, same numbers.
// In training, grad_b_pw and grad_b_dw are exactly zero (BN removes any per-channel shift of z).
#include "common.cuh"

namespace dlkunet {
namespace cuda {
namespace {

struct BnView {  // what the epilogues need to rebuild xhat and the ReLU mask
  const float *b_pw, *gamma, *beta, *mean, *var;
  float eps;
  bool relu;
};

template <class T>
struct EpiBwdStats {
  Act<T> gy;
  BnView bn;
  int rows;
  float *part_g, *part_gx;
  __device__ __forceinline__ void operator()(float (&acc)[4][4], int tx, int ty, int p0, int r0, const int* sn,
                                             const int* sh, const int* sw) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + ty * 4 + j;
      const bool rv = r < rows;  // no early exit: all 16 lanes take part in the shuffles
      float sg = 0.f, sgx = 0.f;
      if (rv) {
        const float bias = bn.b_pw[r], m = bn.mean[r], rstd = rsqrtf(bn.var[r] + bn.eps);
        const float ga = bn.gamma[r], be = bn.beta[r];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int pp = tx + 16 * i;
          if (sn[pp] < 0) continue;
          const float xh = (acc[i][j] + bias - m) * rstd;
          float gv = gy.load(sn[pp], r, sh[pp], sw[pp]);
          if (bn.relu && fmaf(xh, ga, be) <= 0.f) gv = 0.f;
          sg += gv;
          sgx = fmaf(gv, xh, sgx);
        }
      }
      sg = sum16(sg);
      sgx = sum16(sgx);
      if (tx == 0 && rv) {
        part_g[(int64_t)blockIdx.x * rows + r] = sg;
        part_gx[(int64_t)blockIdx.x * rows + r] = sgx;
      }
    }
  }
};

template <class T, class S>
struct EpiBwdDz {  // dz as a channel-major plane of S
  Act<T> gy;
  BnView bn;
  int rows;
  const float *cA, *cB, *cC;
  S* dz;
  int64_t P;
  __device__ __forceinline__ void operator()(float (&acc)[4][4], int tx, int ty, int p0, int r0, const int* sn,
                                             const int* sh, const int* sw) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + ty * 4 + j;
      if (r >= rows) continue;
      const float bias = bn.b_pw[r], m = bn.mean[r], rstd = rsqrtf(bn.var[r] + bn.eps);
      const float ga = bn.gamma[r], be = bn.beta[r], a = cA[r], b = cB[r], c = cC[r];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int pp = tx + 16 * i;
        if (sn[pp] < 0) continue;
        const float xh = (acc[i][j] + bias - m) * rstd;
        float gv = gy.load(sn[pp], r, sh[pp], sw[pp]);
        if (bn.relu && fmaf(xh, ga, be) <= 0.f) gv = 0.f;
        dz[r * P + p0 + pp] = from_f<S>(fmaf(a, gv, fmaf(b, xh, c)));
      }
    }
  }
};

__device__ double block_sum_256(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int o = 128; o > 0; o >>= 1) {
    if ((int)threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  const double s = red[0];
  __syncthreads();  // red is reused by the next call
  return s;
}

// One block per output channel.
__global__ void __launch_bounds__(256) bn_bwd_finalize_kernel(const float* __restrict__ part_g,
                                                              const float* __restrict__ part_gx, int nblk, int rows,
                                                              int P, BnView bn, bool training, float* cA, float* cB,
                                                              float* cC, float* grad_gamma, float* grad_beta,
                                                              float* grad_b_pw) {
  __shared__ double red[256];
  const int r = blockIdx.x;
  double sg = 0.0, sgx = 0.0;
  for (int b = threadIdx.x; b < nblk; b += 256) {
    sg += part_g[(int64_t)b * rows + r];
    sgx += part_gx[(int64_t)b * rows + r];
  }
  sg = block_sum_256(sg, red);
  sgx = block_sum_256(sgx, red);
  if (threadIdx.x == 0) {
    const double scale = (double)bn.gamma[r] * (double)rsqrtf(bn.var[r] + bn.eps);
    grad_beta[r] = (float)sg;
    grad_gamma[r] = (float)sgx;
    cA[r] = (float)scale;
    if (training) {
      cB[r] = (float)(-scale * sgx / P);
      cC[r] = (float)(-scale * sg / P);
      grad_b_pw[r] = 0.f;
    } else {
      cB[r] = 0.f;
      cC[r] = 0.f;
      grad_b_pw[r] = (float)(scale * sg);
    }
  }
}

struct Layout {  // offsets into the float32 workspace
  int64_t part_g, part_gx, coef, d, dz, gd, wpart, dwpart, total;
};

Layout layout(const DwConvProblem& p) {
  const int P = p.N * p.H * p.W;
  const int64_t nblk = cdiv(P, BM);
  int chunk = 0;
  const int S = wgrad_splits(p.Cout, p.Cin, P, &chunk);
  Layout l;
  l.part_g = 0;
  l.part_gx = l.part_g + nblk * p.Cout;
  l.coef = l.part_gx + nblk * p.Cout;
  l.d = l.coef + 3 * (int64_t)p.Cout;
  l.dz = l.d + (int64_t)p.Cin * P;
  l.gd = l.dz + (int64_t)p.Cout * P;
  l.wpart = l.gd + plane_floats(p.Cin, P, p.dtype);
  l.dwpart = l.wpart + (int64_t)S * p.Cout * p.Cin;
  l.total = l.dwpart + dw_weight_workspace(p.Cin, P, p.k);
  return l;
}

}  // namespace

int64_t dwconv_backward_workspace(const DwConvProblem& p) { return layout(p).total; }

cudaError_t dwconv_backward(const DwConvProblem& p, View4 grad_y, View4 x, const DwConvParams& w, const float* mean,
                            const float* var, bool training, float eps, bool relu, View4 grad_x,
                            const DwConvGrads& gr, float* ws, cudaStream_t stream) {
  const Geo g{p.N, p.H, p.W, p.N * p.H * p.W};
  const int nblk = (int)cdiv(g.P, BM);
  const Layout l = layout(p);
  const BnView bn{w.b_pw, w.gamma, w.beta, mean, var, eps, relu};
  float *cA = ws + l.coef, *cB = cA + p.Cout, *cC = cB + p.Cout;
  const Mma mode = mma_mode(p.dtype, p.tf32, p.tensor_cores);
  with_t(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Act<T> xa = act<T>(x), gya = act<T>(grad_y), gxa = act<T>(grad_x);
    T* gd = reinterpret_cast<T*>(ws + l.gd);
    with_mma<T>(mode, [&](auto m) {
      constexpr Mma M = decltype(m)::value;
      using S = PlaneOf<M, T>;  // d and dz feed only this mode's GEMMs
      S *d = reinterpret_cast<S*>(ws + l.d), *dz = reinterpret_cast<S*>(ws + l.dz);
      LoadPlane<S> load{};
      with_k(p.k, [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        load = launch_plane(LoadDw<T, K>{xa, w.w_dw, w.b_dw, p.k, p.H, p.W}, x.sc == 1, g, p.Cin, d, stream);
      });
      const EpiBwdStats<T> stats{gya, bn, p.Cout, ws + l.part_g, ws + l.part_gx};
      launch_pix_gemm_as<M>(load, w.w_pw, p.Cin, 1, p.Cout, p.Cin, g, stats, stream);
      bn_bwd_finalize_kernel<<<p.Cout, 256, 0, stream>>>(ws + l.part_g, ws + l.part_gx, nblk, p.Cout, g.P, bn,
                                                         training, cA, cB, cC, gr.gamma, gr.beta, gr.b_pw);
      const EpiBwdDz<T, S> epi_dz{gya, bn, p.Cout, cA, cB, cC, dz, g.P};
      launch_pix_gemm_as<M>(load, w.w_pw, p.Cin, 1, p.Cout, p.Cin, g, epi_dz, stream);
      // grad_d[ci][p] = sum_co w_pw[co][ci] * dz[co][p]: w_pw read transposed (row ci, k co).
      launch_pix_gemm_as<M>(channel_major(dz, g.P, p.Cout), w.w_pw, 1, p.Cin, p.Cin, p.Cout, g,
                            EpiStorePlane<T>{gd, g.P, p.Cin}, stream);
      launch_wgrad_as<M>(channel_major(dz, g.P, p.Cout), load, p.Cout, p.Cin, -1, g, ws + l.wpart, stream);
    });
    int chunk = 0;
    const int S = wgrad_splits(p.Cout, p.Cin, g.P, &chunk);
    launch_reduce_splits(ws + l.wpart, S, (int64_t)p.Cout * p.Cin, p.Cin, p.Cin, gr.w_pw, nullptr, stream);
    with_k(p.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      launch_dw_bwd_input<K>(gd, w.w_dw, p.k, 1, g, p.Cin, static_cast<const T*>(nullptr), OutAct<T>{gxa}, stream);
      launch_dw_bwd_weight<K>(gd, SrcAct<T>{xa}, p.k, 1, g, p.Cin, ws + l.dwpart, gr.w_dw, gr.b_dw, stream);
    });
  });
  if (training) cudaMemsetAsync(gr.b_dw, 0, sizeof(float) * p.Cin, stream);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dlkunet
