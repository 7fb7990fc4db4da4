// dwconv_bn_act forward: y = act(BN(pw(dw(x)))).
// The depthwise taps are computed once per pass: inside the GEMM's operand loader when one block's
// row tiles hold every output channel (Cout <= BN, and on tensor cores up to max_row_tiles x BN:
// 384 for 16-bit, 192 for TF32), else once into a plane (float32; 16-bit for 16-bit MMAs) that the
// GEMM reads (recomputing them per row tile would cost Cout/BN times the depthwise work).  On tensor
// cores a 3 x 3 conv is staged instead of loaded tap by tap (StagedDw, below).
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
      if (mean_copy && blockIdx.x == 0 && tx == 0) {
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
      if (mean_copy && blockIdx.x == 0) {
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

struct EpiDwStats {  // part_mean/part_m2[block][row]: the block's statistics of z = acc + b_pw
  const float* b_pw;
  int rows;
  Geo g;
  PixTiles tiles;
  float *part_mean, *part_m2;
  __device__ __forceinline__ void operator()(float (&acc)[4][4], int tx, int ty, int p0, int r0, const int* sn,
                                             const int* sh, const int* sw) const {
    const int nvalid = tiles.count(blockIdx.x, g);
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

// One block per channel: merge the GEMM blocks' (count, mean, M2) into the batch mean and biased
// variance.
__global__ void __launch_bounds__(256) bn_stats_finalize_kernel(const float* __restrict__ part_mean,
                                                                const float* __restrict__ part_m2, Geo g,
                                                                PixTiles tiles, int rows, float* mean_out,
                                                                float* var_out) {
  __shared__ double red[256];
  const int r = blockIdx.x, nblk = tiles.blocks(g);
  double s = 0.0;
  for (int b = threadIdx.x; b < nblk; b += 256) s += (double)tiles.count(b, g) * part_mean[(int64_t)b * rows + r];
  const double mean = block_sum_256(s, red) / g.P;
  double q = 0.0;
  for (int b = threadIdx.x; b < nblk; b += 256) {
    const double d = (double)part_mean[(int64_t)b * rows + r] - mean;
    q += (double)part_m2[(int64_t)b * rows + r] + (double)tiles.count(b, g) * d * d;
  }
  const double m2 = block_sum_256(q, red);
  if (threadIdx.x == 0) {
    mean_out[r] = (float)mean;
    var_out[r] = (float)(m2 / g.P);
  }
}

// ---------------------------------------------------------------- the staged depthwise operand

// The fused forward's operand for 3 x 3 depthwise convs on tensor cores: per K step, the BK
// channels of a th x tw pixel rectangle plus its one-pixel halo are loaded once into shared memory
// (16-byte loads where channels are contiguous and aligned: 8 bfloat16/float16 or 4 float32
// channels each), and every tap is then computed from there with the channel's weights in
// registers, instead of nine loads from L1 per operand element.
constexpr int STAGED_K = 3;
constexpr int STAGED_RADIUS = STAGED_K / 2;
constexpr int STAGED_MAX_PIXELS = 128;  // halo pixels a block stages: 8 KB of float32 per K step

template <class T>
struct StagedDw {
  Act<T> x;
  const float* __restrict__ w;  // (Cin, 9)
  const float* __restrict__ b;  // (Cin)
  bool vector_loads;            // channels contiguous, 16-byte aligned at every pixel and at channel 0
};

// The rectangle that covers an H x W image with the fewest blocks (each BM pixels of GEMM work;
// then the smallest halo) among th x tw <= BM whose halo fits STAGED_MAX_PIXELS (tw = W, 8, 16 or
// 32): 8 x 8 at 224, 112 and 56, 4 x 16 at 28 and 60, 4 x 14 at 14.
static PixTiles staged_tiles(int H, int W) {
  PixTiles best{0, 0, 0, 0};
  int64_t best_blocks = 0, best_halo = 0;
  const int widths[] = {W, 8, 16, 32};
  for (int tw : widths) {
    if (tw > W || tw > BM) continue;
    int th = std::min(BM / tw, H);
    while (th > 0 && (th + 2 * STAGED_RADIUS) * (tw + 2 * STAGED_RADIUS) > STAGED_MAX_PIXELS) --th;
    if (th == 0) continue;
    const int64_t halo = (int64_t)(th + 2 * STAGED_RADIUS) * (tw + 2 * STAGED_RADIUS);
    const int tiles_h = (int)cdiv(H, th), tiles_w = (int)cdiv(W, tw);
    const int64_t blocks = (int64_t)tiles_h * tiles_w;
    if (!best.th || blocks < best_blocks || (blocks == best_blocks && halo < best_halo))
      best = PixTiles{th, tw, tiles_h, tiles_w}, best_blocks = blocks, best_halo = halo;
  }
  return best;  // some width always fits: min(W, 8) with one row
}

// mma_pix_gemm_kernel with StagedDw as its operand over PixTiles rectangles.  A K step is: the next
// step's halo and weights into registers; this step's MMAs; the halo into shared memory; barrier;
// the next step's taps into the other operand buffer; barrier.
template <Mma M, int RT, class T, class Epi>
__global__ void __launch_bounds__(NT, mma_min_blocks<M, RT>())
    mma_dw_gemm_kernel(StagedDw<T> A, const float* __restrict__ wm, int rows, int kdim, Geo g, PixTiles tiles,
                       Epi epi) {
#if DLK_MMA
  using Op = MmaOperand<M>;
  constexpr int VEC = STAGE_BYTES / (int)sizeof(T);          // channels per 16-byte load
  constexpr int LOADS_PER_PIXEL = BK / VEC;
  constexpr int LOADS = STAGED_MAX_PIXELS * LOADS_PER_PIXEL / NT;  // per thread and step
  static_assert(LOADS * NT == STAGED_MAX_PIXELS * LOADS_PER_PIXEL, "whole halo loads per thread");
  constexpr int OUT_PER_THREAD = BK * BM / NT;
  static_assert(NT % BK == 0 && OUT_PER_THREAD * (NT / BK) == BM, "a thread's outputs share its channel");
  __shared__ __align__(16) T Xs[STAGED_MAX_PIXELS][BK];  // the halo: (pixel, channel)
  __shared__ PixGemmShared<M, RT> sm;
  const int* s_n = sm.sn;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int r0 = blockIdx.y * BN * RT;
  const int wr = (warp >> 1) * MMA_FRAG, wp = (warp & 1) * 2 * MMA_FRAG;
  tiles.pixels(blockIdx.x, g, sm.sn, sm.sh, sm.sw);

  // This thread's halo loads: the same pixels every step (offset of channel 0, or -1 outside the
  // image: zeros, the convs' padding), channels k0 + part .. + VEC - 1.
  const int per_image = tiles.tiles_h * tiles.tiles_w, t_img = blockIdx.x % per_image;
  const int n = blockIdx.x / per_image;
  const int h0 = (t_img / tiles.tiles_w) * tiles.th - STAGED_RADIUS;
  const int w0 = (t_img % tiles.tiles_w) * tiles.tw - STAGED_RADIUS;
  const int halo_w = tiles.tw + 2 * STAGED_RADIUS;
  const int halo_pixels = (tiles.th + 2 * STAGED_RADIUS) * halo_w;
  static_assert(NT % LOADS_PER_PIXEL == 0, "a thread loads the same channels at each of its pixels");
  const int part = (tid % LOADS_PER_PIXEL) * VEC;
  int64_t src[LOADS];
#pragma unroll
  for (int j = 0; j < LOADS; ++j) {
    const int hp = (tid + j * NT) / LOADS_PER_PIXEL;
    const int h = h0 + hp / halo_w, w = w0 + hp % halo_w;
    const bool inside = hp < halo_pixels && h >= 0 && h < g.H && w >= 0 && w < g.W;
    src[j] = inside ? n * A.x.sn + h * A.x.sh + w * A.x.sw : -1;
  }
  uint4 halo[LOADS];
  auto load_halo = [&](int k0) {
#pragma unroll
    for (int j = 0; j < LOADS; ++j) {
      const int c = k0 + part;
      T* e = reinterpret_cast<T*>(&halo[j]);
      if (src[j] >= 0 && A.vector_loads && c + VEC <= kdim) {
        halo[j] = __ldg(reinterpret_cast<const uint4*>(A.x.data + src[j] + c));
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          e[i] = src[j] >= 0 && c + i < kdim ? A.x.data[src[j] + (int64_t)(c + i) * A.x.sc] : from_f<T>(0.f);
      }
    }
  };
  auto store_halo = [&]() {
#pragma unroll
    for (int j = 0; j < LOADS; ++j) {
      const int hp = (tid + j * NT) / LOADS_PER_PIXEL;
      if (hp < halo_pixels) *reinterpret_cast<uint4*>(&Xs[hp][part]) = halo[j];
    }
  };
  // Thread tid computes channel tid % BK of pixels tid / BK + j * (NT / BK).
  const int kk = tid % BK;
  auto taps_into = [&](int k0, int buf) {
    const int c = k0 + kk;
    float wt[STAGED_K * STAGED_K], bias = 0.f;
    if (c < kdim) {
      bias = __ldg(A.b + c);
#pragma unroll
      for (int t = 0; t < STAGED_K * STAGED_K; ++t) wt[t] = __ldg(A.w + (int64_t)c * STAGED_K * STAGED_K + t);
    }
#pragma unroll
    for (int j = 0; j < OUT_PER_THREAD; ++j) {
      const int pp = tid / BK + j * (NT / BK);
      float acc = 0.f;
      if (c < kdim && s_n[pp] >= 0) {
        const int base = (pp / tiles.tw) * halo_w + pp % tiles.tw;
        acc = bias;
#pragma unroll
        for (int dy = 0; dy < STAGED_K; ++dy)
#pragma unroll
          for (int dx = 0; dx < STAGED_K; ++dx)
            acc = fmaf(wt[dy * STAGED_K + dx], to_f(Xs[base + dy * halo_w + dx][kk]), acc);
      }
      sm.as[buf][kk][pp] = Op::cvt(acc);
    }
  };

  WarpTile<M, nvcuda::wmma::row_major> tile[RT];
#pragma unroll
  for (int t = 0; t < RT; ++t) tile[t].zero();
  WeightStage<M, RT> weights;
  load_halo(0);
  weights.fetch(wm, kdim, 1, r0, rows, kdim, 0);
  store_halo();
  weights.stash(sm.bs(0));
  __syncthreads();  // the halo and the pixels
  taps_into(0, 0);
  __syncthreads();
  int buf = 0;
  for (int k0 = 0; k0 < kdim; k0 += BK) {
    const bool more = k0 + BK < kdim;
    if (more) {
      load_halo(k0 + BK);
      weights.fetch(wm, kdim, 1, r0, rows, kdim, k0 + BK);
    }
    sm.step(tile, buf, wr, wp);
    if (more) {
      // Xs was last read by the previous step's taps, the other buffers by its MMAs: both closed
      // by the barrier that ended it.
      store_halo();
      weights.stash(sm.bs(buf ^ 1));
      __syncthreads();
      taps_into(k0 + BK, buf ^ 1);
    }
    __syncthreads();
    buf ^= 1;
  }
  // (p0 = blockIdx.x * BM is no pixel index here: the epilogues used with rectangles, EpiDwApply and
  // EpiDwStats, take their pixels from sm.sn/sh/sw and their block from blockIdx.x.)
  finish_row_tiles<M, RT>(tile, sm.cs(), wr, wp, (int)blockIdx.x * BM, r0, rows, sm.sn, sm.sh, sm.sw, epi);
#else
  __trap();  // never launched: the launchers pick Mma::FP32 below compute capability 8.0
#endif
}

}  // namespace

// Whether the depthwise output goes through a plane (see the file comment).
static bool dw_via_plane(const DwConvProblem& p) {
  return cdiv(p.Cout, BN) > max_row_tiles(mma_mode(p.dtype, p.tf32, p.tensor_cores));
}

// Whether the fused GEMM stages its depthwise operand (StagedDw), and the blocks' pixels.
static bool dw_staged(const DwConvProblem& p) {
  return !dw_via_plane(p) && p.k == STAGED_K && mma_mode(p.dtype, p.tf32, p.tensor_cores) != Mma::FP32;
}
static PixTiles forward_tiles(const DwConvProblem& p) { return dw_staged(p) ? staged_tiles(p.H, p.W) : LINEAR_TILES; }

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
  const Geo g{p.N, p.H, p.W, p.N * p.H * p.W};
  return (training ? 2 * (int64_t)forward_tiles(p).blocks(g) * p.Cout : 0) + (dw_via_plane(p) ? (int64_t)p.Cin * g.P : 0);
}

cudaError_t dwconv_forward(const DwConvProblem& p, View4 x, const DwConvParams& w, const float* mean_in,
                           const float* var_in, bool training, float eps, bool relu, View4 y, float* mean_out,
                           float* var_out, float* workspace, cudaStream_t stream) {
  const Geo g{p.N, p.H, p.W, p.N * p.H * p.W};
  const PixTiles tiles = forward_tiles(p);
  const int nblk = tiles.blocks(g);
  const Mma mode = mma_mode(p.dtype, p.tf32, p.tensor_cores);
  float* part = workspace;  // training: per-block statistics
  float* d_plane = workspace + (training ? 2 * (int64_t)nblk * p.Cout : 0);
  with_t(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Act<T> xa = act<T>(x), ya = act<T>(y);
    with_mma<T>(mode, [&](auto m) {
      constexpr Mma M = decltype(m)::value;
      // The GEMM passes, each launched by `launch(epilogue)`: in training, statistics then apply.
      auto passes = [&](const auto& launch) {
        if (training) {
          launch(EpiDwStats{w.b_pw, p.Cout, g, tiles, part, part + (int64_t)nblk * p.Cout});
          bn_stats_finalize_kernel<<<p.Cout, 256, 0, stream>>>(part, part + (int64_t)nblk * p.Cout, g, tiles, p.Cout,
                                                               mean_out, var_out);
        }
        const float* mean = training ? mean_out : mean_in;
        const float* var = training ? var_out : var_in;
        launch(EpiDwApply<T>{ya, w.b_pw, w.gamma, w.beta, mean, var, eps, relu, p.Cout,
                             training ? nullptr : mean_out, training ? nullptr : var_out});
      };
      const int row_tiles = (int)cdiv(p.Cout, BN);
      with_k(p.k, [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        const LoadDw<T, K> load{xa, w.w_dw, w.b_dw, p.k, p.H, p.W};
        if (dw_via_plane(p)) {
          const auto plane = launch_plane(load, x.sc == 1, g, p.Cin, reinterpret_cast<PlaneOf<M, T>*>(d_plane), stream);
          passes([&](const auto& epi) { launch_pix_gemm_as<M, 1>(plane, w.w_pw, p.Cin, 1, p.Cout, p.Cin, g, epi, stream); });
          return;
        }
        // (dw_staged(p) holds exactly when this branch is compiled and the plane is not taken.)
        if constexpr (K == STAGED_K && M != Mma::FP32) {
          const StagedDw<T> staged{xa, w.w_dw, w.b_dw, vector_loads(xa)};
          with_row_tiles<M>(row_tiles, [&](auto rt) {
            constexpr int RT = decltype(rt)::value;
            const dim3 grid((unsigned)nblk, (unsigned)cdiv(p.Cout, BN * RT));
            passes([&](const auto& epi) {
              mma_dw_gemm_kernel<M, RT, T><<<grid, NT, 0, stream>>>(staged, w.w_pw, p.Cout, p.Cin, g, tiles, epi);
            });
          });
        } else {
          with_row_tiles<M>(row_tiles, [&](auto rt) {
            constexpr int RT = decltype(rt)::value;
            passes([&](const auto& epi) {
              launch_pix_gemm_as<M, RT>(load, w.w_pw, p.Cin, 1, p.Cout, p.Cin, g, epi, stream);
            });
          });
        }
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dlkunet
