// dwconv_bn_act forward: y = act(BN(pw(dw(x)))).
// The depthwise taps are computed once per pass: inside the GEMM's operand loader when one block's
// row tiles hold every output channel (Cout <= BN, and on tensor cores up to max_row_tiles x BN:
// 384 for 16-bit, 192 for TF32), else once into a plane (float32; 16-bit for 16-bit MMAs) that the
// GEMM reads (recomputing them per row tile would cost Cout/BN times the depthwise work).
// Eval: each 64-pixel x 64-channel tile accumulates the pointwise product (tensor cores or fp32,
// common.cuh) and applies bias, BN (as one per-channel scale and shift) and ReLU in the epilogue.
// Training: a first GEMM pass writes only per-tile (mean, M2) statistics of z (exact two-pass within
// the tile, in float32; z itself is never stored); a per-channel kernel merges the tiles in double
// (Chan et al.); a second GEMM pass recomputes z bit for bit and writes y through the eval epilogue
// with the batch statistics.  z is never written and re-read: y is written once.
#include "common.cuh"

namespace dlkunet {
namespace cuda {
namespace {

// y = act(BN(z)), z = acc + b_pw, BN with the given statistics (running ones in eval, the batch's in
// training) folded into one per-channel scale and shift.  Eval also copies the running statistics
// to the op's mean/var outputs (mean_copy/var_copy, else null) from the first pixel tile: no
// separate copy launches.
template <class T>
struct EpiDwApply {
  Act<T> y;
  const float *b_pw, *gamma, *beta, *mean, *var;
  float eps;
  bool relu;
  int rows;
  float *mean_copy, *var_copy;
  __device__ __forceinline__ void operator()(float (&acc)[4][4], int tx, int ty, int p0, int r0, const int* sn,
                                             const int* sh, const int* sw) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + ty * 4 + j;
      if (r >= rows) continue;
      if (mean_copy && p0 == 0 && tx == 0) {
        mean_copy[r] = mean[r];
        var_copy[r] = var[r];
      }
      const float scale = gamma[r] * rsqrtf(var[r] + eps);
      const float shift = (b_pw[r] - mean[r]) * scale + beta[r];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int pp = tx + 16 * i;
        if (sn[pp] < 0) continue;
        float v = fmaf(acc[i][j], scale, shift);
        if (relu) v = fmaxf(v, 0.f);
        y.store(sn[pp], r, sh[pp], sw[pp], v);
      }
    }
  }
  // The same from the MMA kernels' shared accumulator tile, channels-fast for channels_last y.
  __device__ __forceinline__ void tile(const float* cs, int ldc, int p0, int r0, const int* sn, const int* sh,
                                       const int* sw) const {
    __shared__ float s_scale[BN], s_shift[BN];
    const int t = threadIdx.x, r = r0 + t;
    if (t < BN && r < rows) {
      s_scale[t] = gamma[r] * rsqrtf(var[r] + eps);
      s_shift[t] = (b_pw[r] - mean[r]) * s_scale[t] + beta[r];
      if (mean_copy && p0 == 0) {
        mean_copy[r] = mean[r];
        var_copy[r] = var[r];
      }
    }
    __syncthreads();
    for_each_in_tile<BN, BM>(y.sc == 1, [&](int rr, int pp) {
      if (r0 + rr >= rows || sn[pp] < 0) return;
      float v = fmaf(cs[rr * ldc + pp], s_scale[rr], s_shift[rr]);
      if (relu) v = fmaxf(v, 0.f);
      y.store(sn[pp], r0 + rr, sh[pp], sw[pp], v);
    });
  }
};

struct EpiDwStats {  // part_mean/part_m2[tile][row]: the tile's statistics of z = acc + b_pw
  const float* b_pw;
  int rows, P;
  float *part_mean, *part_m2;
  __device__ __forceinline__ void operator()(float (&acc)[4][4], int tx, int ty, int p0, int r0, const int* sn,
                                             const int* sh, const int* sw) const {
    const int nvalid = min(BM, P - p0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + ty * 4 + j;
      const bool rv = r < rows;  // no early exit: all 16 lanes take part in the shuffles
      const float bias = rv ? b_pw[r] : 0.f;
      float z[4], s = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int pp = tx + 16 * i;
        z[i] = acc[i][j] + bias;
        if (sn[pp] >= 0) s += z[i];
      }
      const float m = sum16(s) / (float)nvalid;
      float q = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float d = z[i] - m;
        if (sn[tx + 16 * i] >= 0) q = fmaf(d, d, q);
      }
      q = sum16(q);
      if (tx == 0 && rv) {
        part_mean[(int64_t)blockIdx.x * rows + r] = m;
        part_m2[(int64_t)blockIdx.x * rows + r] = q;
      }
    }
  }
};

// Block-wide sum of a double over 256 threads; every thread gets the result.
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

// One block per channel: merge the tiles' (count, mean, M2) into the batch mean and biased variance.
__global__ void __launch_bounds__(256) bn_stats_finalize_kernel(const float* __restrict__ part_mean,
                                                                const float* __restrict__ part_m2, int nblk,
                                                                int rows, int P, float* mean_out, float* var_out) {
  __shared__ double red[256];
  const int r = blockIdx.x;
  double s = 0.0;
  for (int b = threadIdx.x; b < nblk; b += 256) s += (double)min(BM, P - b * BM) * part_mean[(int64_t)b * rows + r];
  const double mean = block_sum_256(s, red) / P;
  double q = 0.0;
  for (int b = threadIdx.x; b < nblk; b += 256) {
    const double d = (double)part_mean[(int64_t)b * rows + r] - mean;
    q += (double)part_m2[(int64_t)b * rows + r] + (double)min(BM, P - b * BM) * d * d;
  }
  const double m2 = block_sum_256(q, red);
  if (threadIdx.x == 0) {
    mean_out[r] = (float)mean;
    var_out[r] = (float)(m2 / P);
  }
}

}  // namespace

// Whether the depthwise output goes through a plane (see the file comment).
static bool dw_via_plane(const DwConvProblem& p) {
  return cdiv(p.Cout, BN) > max_row_tiles(mma_mode(p.dtype, p.tf32, p.tensor_cores));
}

// f(integral_constant<int, RT>) for a fused block of `tiles` row tiles (at most mode M's): builds of
// 1 to 4 tiles and of 6 (5 run in a 6-tile block, whose spare tile reads zero weights).
template <Mma M, class F>
void with_row_tiles(int tiles, F&& f) {
  constexpr int most = mma_max_row_tiles<M>();
  if constexpr (most >= 6) {
    if (tiles > 4) return f(std::integral_constant<int, 6>{});
  }
  if constexpr (most >= 4) {
    if (tiles == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (most >= 3) {
    if (tiles == 3) return f(std::integral_constant<int, 3>{});
  }
  if constexpr (most >= 2) {
    if (tiles == 2) return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

int64_t dwconv_forward_workspace(const DwConvProblem& p, bool training) {
  const int64_t P = (int64_t)p.N * p.H * p.W;
  return (training ? 2 * cdiv(P, BM) * p.Cout : 0) + (dw_via_plane(p) ? (int64_t)p.Cin * P : 0);
}

cudaError_t dwconv_forward(const DwConvProblem& p, View4 x, const DwConvParams& w, const float* mean_in,
                           const float* var_in, bool training, float eps, bool relu, View4 y, float* mean_out,
                           float* var_out, float* workspace, cudaStream_t stream) {
  const Geo g{p.N, p.H, p.W, p.N * p.H * p.W};
  const int nblk = (int)cdiv(g.P, BM);
  const Mma mode = mma_mode(p.dtype, p.tf32, p.tensor_cores);
  float* part = workspace;  // training: per-tile statistics
  float* d_plane = workspace + (training ? 2 * (int64_t)nblk * p.Cout : 0);
  with_t(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Act<T> xa = act<T>(x), ya = act<T>(y);
    with_mma<T>(mode, [&](auto m) {
      constexpr Mma M = decltype(m)::value;
      auto gemm = [&](const auto& load, auto row_tiles) {
        constexpr int RT = decltype(row_tiles)::value;
        if (training) {
          const EpiDwStats stats{w.b_pw, p.Cout, g.P, part, part + (int64_t)nblk * p.Cout};
          launch_pix_gemm_as<M, RT>(load, w.w_pw, p.Cin, 1, p.Cout, p.Cin, g, stats, stream);
          bn_stats_finalize_kernel<<<p.Cout, 256, 0, stream>>>(part, part + (int64_t)nblk * p.Cout, nblk, p.Cout,
                                                               g.P, mean_out, var_out);
        }
        const float* mean = training ? mean_out : mean_in;
        const float* var = training ? var_out : var_in;
        const EpiDwApply<T> epi{ya, w.b_pw, w.gamma, w.beta, mean, var, eps, relu, p.Cout,
                                training ? nullptr : mean_out, training ? nullptr : var_out};
        launch_pix_gemm_as<M, RT>(load, w.w_pw, p.Cin, 1, p.Cout, p.Cin, g, epi, stream);
      };
      with_k(p.k, [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        const LoadDw<T, K> load{xa, w.w_dw, w.b_dw, p.k, p.H, p.W};
        if (dw_via_plane(p))
          gemm(launch_plane(load, x.sc == 1, g, p.Cin, reinterpret_cast<PlaneOf<M, T>*>(d_plane), stream),
               std::integral_constant<int, 1>{});
        else
          with_row_tiles<M>((int)cdiv(p.Cout, BN), [&](auto rt) { gemm(load, rt); });
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dlkunet
