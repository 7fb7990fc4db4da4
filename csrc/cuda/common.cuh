// Device building blocks shared by the four .cu files (CUDA headers only; each .cu instantiates
// what it uses, so everything here has internal linkage).
//
// Two tiled GEMMs carry all the channel mixing, each in two builds chosen per call by `Mma`:
// tensor cores (WMMA 16x16 fragments: TF32 for float32 when cudnn.allow_tf32 is set, as eager
// convolutions do; float16/bfloat16 in the input dtype; float32 accumulation) on sm_80 and newer,
// and an exact fp32 SIMT build for float32 with TF32 off (or a GPU without these MMAs).
// - pix_gemm:   out[r][p] = sum_k W[r][k] * A(k, p) over a 64-pixel x 64-row tile, where the A
//               loader computes its operand on the fly (a depthwise conv of x, a product of two
//               activations, or a plane: PlaneOf), and an epilogue functor finishes the tile (bias,
//               BN, ReLU, gate, statistics).
// - wgrad_gemm: part[s][r][c] = sum_{p in split s} A(r, p) * B(c, p): weight gradients, split
//               over pixels; reduce_splits_kernel then sums the splits in double.
// Both builds hand the epilogue the same per-thread 4x4 accumulator (the MMA build through shared
// memory), so every epilogue serves both.
// "Plane" buffers are float32 scratch laid out [C][P] with P = N*H*W, p = (n*H + h)*W + w.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "launch.h"

namespace dlkunet {
namespace cuda {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <class T>
struct Act {  // a strided activation tensor
  T* data;
  int64_t sn, sc, sh, sw;
  __device__ __forceinline__ int64_t off(int n, int c, int h, int w) const {
    return n * sn + c * sc + h * sh + w * sw;
  }
  __device__ __forceinline__ float load(int n, int c, int h, int w) const { return to_f(data[off(n, c, h, w)]); }
  __device__ __forceinline__ void store(int n, int c, int h, int w, float v) const {
    data[off(n, c, h, w)] = from_f<T>(v);
  }
};
template <class T>
Act<T> act(View4 v) {
  return Act<T>{static_cast<T*>(v.data), v.sn, v.sc, v.sh, v.sw};
}

// Bytes the staged depthwise kernels load at once: the channels of one pixel, where contiguous.
constexpr int STAGE_BYTES = 16;
constexpr int64_t MAX_GRID_YZ = 65535;
constexpr int64_t STATIC_SMEM_BYTES = 48 * 1024;  // dynamic shared memory without the opt-in

// Whether x's channels can be read STAGE_BYTES at a time at every pixel, from channel 0 on.
template <class T>
bool vector_loads(const Act<T>& x) {
  constexpr int64_t vec = STAGE_BYTES / sizeof(T);
  return x.sc == 1 && reinterpret_cast<uintptr_t>(x.data) % STAGE_BYTES == 0 && x.sn % vec == 0 &&
         x.sh % vec == 0 && x.sw % vec == 0;
}

struct Geo {
  int N, H, W, P;  // P = N*H*W
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Floats of workspace that hold a [C][P] plane in dtype dt.
inline int64_t plane_floats(int64_t C, int64_t P, DType dt) {
  return cdiv(C * P * (dt == DType::F32 ? 4 : 2), (int64_t)sizeof(float));
}

// Host-side dispatch on dtype and on the specialised depthwise sizes (0 = generic runtime size).
template <class T> struct Tag { using type = T; };
template <class F>
void with_t(DType dt, F&& f) {
  switch (dt) {
    case DType::F16: f(Tag<__half>{}); break;
    case DType::BF16: f(Tag<__nv_bfloat16>{}); break;
    default: f(Tag<float>{}); break;
  }
}
template <class F>
void with_k(int k, F&& f) {
  switch (k) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

constexpr int BM = 64;   // pixels per pix_gemm tile; rows/cols per wgrad tile
constexpr int BN = 64;   // rows per tile
constexpr int BK = 16;   // reduction step
constexpr int NT = 256;  // threads per GEMM block: 16 x 16, each owning 4 x 4 outputs

// ---------------------------------------------------------------- GEMM precision

// How a GEMM multiplies: on CUDA cores in float32, or on tensor cores with its operands in TF32,
// float16 or bfloat16 (float32 accumulation in every case).
enum class Mma { FP32, TF32, F16, BF16 };

// A problem's mode: its dtype's MMA where the GPU has it (float32 only when TF32 is allowed, the
// rule of eager convolutions), else exact float32.
inline Mma mma_mode(DType dt, bool tf32, bool tensor_cores) {
  if (!tensor_cores) return Mma::FP32;
  switch (dt) {
    case DType::F16: return Mma::F16;
    case DType::BF16: return Mma::BF16;
    default: return tf32 ? Mma::TF32 : Mma::FP32;
  }
}

// Calls f(integral_constant<Mma, mode>), instantiating only the modes inputs of type T can take.
template <Mma M> using MmaC = std::integral_constant<Mma, M>;
template <class T, class F>
void with_mma(Mma mode, F&& f) {
  if constexpr (std::is_same<T, float>::value) {
    if (mode == Mma::TF32) return f(MmaC<Mma::TF32>{});
  } else if constexpr (std::is_same<T, __half>::value) {
    if (mode == Mma::F16) return f(MmaC<Mma::F16>{});
  } else {
    if (mode == Mma::BF16) return f(MmaC<Mma::BF16>{});
  }
  f(MmaC<Mma::FP32>{});
}

// ---------------------------------------------------------------- operand loaders: (k, n, h, w, p)

// Depthwise k x k conv of x (zero padding k/2) plus its bias, at channel c and pixel (n, h, w).
template <class T, int K>
struct LoadDw {
  Act<T> x;
  const float* __restrict__ w;
  const float* __restrict__ b;
  int k_rt, H, W;
  __device__ __forceinline__ float operator()(int c, int n, int h, int wo, int) const {
    const int k = K > 0 ? K : k_rt;
    const int r = k / 2;
    const float* wc = w + (int64_t)c * k * k;
    const T* base = x.data + n * x.sn + c * x.sc;
    float acc = __ldg(b + c);
#pragma unroll
    for (int ky = 0; ky < (K > 0 ? K : k); ++ky) {
      const int hh = h + ky - r;
      if (hh < 0 || hh >= H) continue;
#pragma unroll
      for (int kx = 0; kx < (K > 0 ? K : k); ++kx) {
        const int ww = wo + kx - r;
        if (ww < 0 || ww >= W) continue;
        acc = fmaf(__ldg(wc + ky * k + kx), to_f(base[hh * x.sh + ww * x.sw]), acc);
      }
    }
    return acc;
  }
  __device__ __forceinline__ bool channels_contiguous() const { return x.sc == 1; }
};

// Element (c, p) of a plane at d[c * sc + p * sp]: channel-major [C][P] (sc = P, sp = 1) or
// pixel-major [P][C] (sc = 1, sp = C); channels >= `ones_from` read as 1 (a bias column).  Planes
// are float32, or the input's 16-bit dtype where only 16-bit MMAs read them (PlaneOf).
template <class S = float>
struct LoadPlane {
  const S* __restrict__ d;
  int sc, sp;  // P and C fit an int (the glue checks N*H*W); their products may not
  int ones_from;
  __device__ __forceinline__ float operator()(int c, int, int, int, int p) const {
    return c < ones_from ? to_f(d[(int64_t)c * sc + (int64_t)p * sp]) : 1.f;
  }
  __device__ __forceinline__ bool channels_contiguous() const { return sc == 1; }
};
template <class S>
LoadPlane<S> channel_major(const S* d, int P, int C) { return LoadPlane<S>{d, P, 1, C}; }
template <class S>
LoadPlane<S> pixel_major(const S* d, int C) { return LoadPlane<S>{d, 1, C, C}; }

template <class T>
struct LoadProd {  // a(n,c,h,w) * b(n,c,h,w), a and b in the same layout
  Act<T> a, b;
  __device__ __forceinline__ float operator()(int c, int n, int h, int w, int) const {
    return a.load(n, c, h, w) * b.load(n, c, h, w);
  }
  __device__ __forceinline__ bool channels_contiguous() const { return a.sc == 1; }
};

// f(c, p) for every (channel, pixel) of a ROWS-channel x COLS-pixel tile, spread over the block's
// threads: consecutive threads on consecutive channels where the global tensor behind the tile has
// contiguous channels (channels_last activations, pixel-major planes), else on consecutive pixels,
// so that a warp's loads or stores coalesce either way.
template <int ROWS, int COLS, class F>
__device__ __forceinline__ void for_each_in_tile(bool channels_fast, F&& f) {
  if (channels_fast) {
    for (int i = threadIdx.x; i < ROWS * COLS; i += NT) f(i % ROWS, i / ROWS);
  } else {
    for (int i = threadIdx.x; i < ROWS * COLS; i += NT) f(i / COLS, i % COLS);
  }
}

// ---------------------------------------------------------------- outputs: (c, n, h, w, p, v)

template <class T>
struct OutAct {
  Act<T> a;
  __device__ __forceinline__ void operator()(int c, int n, int h, int w, int, float v) const { a.store(n, c, h, w, v); }
  __device__ __forceinline__ bool channels_contiguous() const { return a.sc == 1; }
};
template <class S = float>
struct OutPlane {  // a channel-major plane of S
  S* d;
  int64_t P;
  __device__ __forceinline__ void operator()(int c, int, int, int, int p, float v) const { d[c * P + p] = from_f<S>(v); }
  __device__ __forceinline__ bool channels_contiguous() const { return false; }
};

// ---------------------------------------------------------------- pixel-tile GEMM

// (n, h, w) of the tile's pixels p0 .. p0 + count - 1, n = -1 from `pend` on; threads < count write.
__device__ __forceinline__ void tile_pixels(int p0, int count, Geo g, int pend, int* sn, int* sh, int* sw) {
  const int i = threadIdx.x;
  if (i >= count) return;
  const int p = p0 + i;
  if (p < pend) {
    const int t = p / g.W;
    sw[i] = p - t * g.W;
    sh[i] = t % g.H;
    sn[i] = t / g.H;
  } else {
    sn[i] = -1;
    sh[i] = 0;
    sw[i] = 0;
  }
}

// How a pixel GEMM's blocks cover the pixels: runs of BM consecutive pixels p (th == 0), or th x tw
// rectangles of one image (th * tw <= BM; pixel i of a block at row i / tw, column i % tw), as a
// staged depthwise operand needs: its halo then grows with the rectangle's sides, not with W.
struct PixTiles {
  int th, tw, tiles_h, tiles_w;
  __host__ __device__ int blocks(Geo g) const { return th ? g.N * tiles_h * tiles_w : (g.P + BM - 1) / BM; }
  // Pixels of block b inside the image.
  __host__ __device__ int count(int b, Geo g) const {
    if (!th) return min(BM, g.P - b * BM);
    const int t = b % (tiles_h * tiles_w);
    return min(th, g.H - (t / tiles_w) * th) * min(tw, g.W - (t % tiles_w) * tw);
  }
  // (n, h, w) of block b's pixels, n = -1 outside the image; threads < BM write.
  __device__ __forceinline__ void pixels(int b, Geo g, int* sn, int* sh, int* sw) const {
    if (!th) return tile_pixels(b * BM, BM, g, g.P, sn, sh, sw);
    const int i = threadIdx.x;
    if (i >= BM) return;
    const int per_image = tiles_h * tiles_w, t = b % per_image;
    const int ih = i / tw, h = (t / tiles_w) * th + ih, w = (t % tiles_w) * tw + i % tw;
    const bool inside = ih < th && h < g.H && w < g.W;
    sn[i] = inside ? b / per_image : -1;
    sh[i] = inside ? h : 0;
    sw[i] = inside ? w : 0;
  }
};
constexpr PixTiles LINEAR_TILES{0, 0, 0, 0};

// Epilogue contract: operator()(acc, tx, ty, p0, r0, s_n, s_h, s_w), where acc[i][j] belongs to
// pixel p0 + tx + 16*i (valid when s_n[tx + 16*i] >= 0; lanes stay on consecutive pixels, so
// stores coalesce) and row r0 + 4*ty + j (four consecutive rows: one float4 read of Bs per step).
// Every thread of the block calls it (epilogues may use warp shuffles over the 16 lanes that
// share ty).
template <class ALoad, class Epi>
__global__ void __launch_bounds__(NT) pix_gemm_kernel(ALoad A, const float* __restrict__ wm, int64_t w_rs,
                                                      int64_t w_ks, int rows, int kdim, Geo g, Epi epi) {
  __shared__ float As[BK][BM];
  // Rows padded to BN + 4: float4 reads stay 16-byte aligned and the k-fastest fill spreads over banks.
  __shared__ __align__(16) float Bs[BK][BN + 4];
  __shared__ int s_n[BM], s_h[BM], s_w[BM];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int p0 = blockIdx.x * BM, r0 = blockIdx.y * BN;
  const bool channels_fast = A.channels_contiguous();
  tile_pixels(p0, BM, g, g.P, s_n, s_h, s_w);
  __syncthreads();
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < kdim; k0 += BK) {
    for_each_in_tile<BK, BM>(channels_fast, [&](int kk, int pp) {
      const int k = k0 + kk;
      As[kk][pp] = (k < kdim && s_n[pp] >= 0) ? A(k, s_n[pp], s_h[pp], s_w[pp], p0 + pp) : 0.f;
    });
    for (int i = tid; i < BK * BN; i += NT) {
      const int kk = i % BK, rr = i / BK, k = k0 + kk, r = r0 + rr;
      Bs[kk][rr] = (r < rows && k < kdim) ? __ldg(wm + r * w_rs + k * w_ks) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][tx + 16 * i];
      const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][ty * 4]);  // one broadcast LDS.128
      b[0] = bv.x, b[1] = bv.y, b[2] = bv.z, b[3] = bv.w;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  epi(acc, tx, ty, p0, r0, s_n, s_h, s_w);
}

// Sum over the 16 lanes that share ty (lane = (ty & 1) * 16 + tx): xor offsets < 16 stay inside.
__device__ __forceinline__ float sum16(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class S = float>
struct EpiStorePlane {  // out[r][p] = acc, a channel-major plane of S
  S* out;
  int64_t P;
  int rows;
  __device__ __forceinline__ void operator()(float (&acc)[4][4], int tx, int ty, int p0, int r0, const int* sn,
                                             const int*, const int*) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + ty * 4 + j;
      if (r >= rows) continue;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (sn[tx + 16 * i] >= 0) out[r * P + p0 + tx + 16 * i] = from_f<S>(acc[i][j]);
    }
  }
};

template <class T, class Out>
struct EpiGate {  // out = gate * (acc + bias)
  Act<T> gate;
  const float* __restrict__ bias;
  int rows;
  Out out;
  __device__ __forceinline__ void operator()(float (&acc)[4][4], int tx, int ty, int p0, int r0, const int* sn,
                                             const int* sh, const int* sw) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + ty * 4 + j;
      if (r >= rows) continue;
      const float b = bias[r];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int pp = tx + 16 * i;
        if (sn[pp] < 0) continue;
        out(r, sn[pp], sh[pp], sw[pp], p0 + pp, gate.load(sn[pp], r, sh[pp], sw[pp]) * (acc[i][j] + b));
      }
    }
  }
  // The same from the MMA kernels' shared accumulator tile (cs[row * ldc + pixel]), in the order
  // that coalesces the output (see WholeTileEpilogue).
  __device__ __forceinline__ void tile(const float* cs, int ldc, int p0, int r0, const int* sn, const int* sh,
                                       const int* sw) const {
    for_each_in_tile<BN, BM>(out.channels_contiguous(), [&](int rr, int pp) {
      const int r = r0 + rr;
      if (r >= rows || sn[pp] < 0) return;
      out(r, sn[pp], sh[pp], sw[pp], p0 + pp, gate.load(sn[pp], r, sh[pp], sw[pp]) * (cs[rr * ldc + pp] + bias[r]));
    });
  }
};

// Epilogues with a tile() method take the MMA kernels' whole accumulator tile from shared memory
// and may walk it channels-fast: the per-thread 4 x 4 layout puts a warp's 32 stores on 16 pixels,
// 16 sectors apart in channels_last.  Epilogues that reduce across lanes keep that layout.
template <class E, class = void>
struct WholeTileEpilogue : std::false_type {};
template <class E>
struct WholeTileEpilogue<E, std::void_t<decltype(&E::tile)>> : std::true_type {};

// ---------------------------------------------------------------- weight-gradient GEMM (split over pixels)

template <class ALoad, class BLoad>
__global__ void __launch_bounds__(NT) wgrad_gemm_kernel(ALoad A, BLoad B, int R, int Ccols, int chunk, Geo g,
                                                        float* __restrict__ part) {
  __shared__ __align__(16) float As[BK][BN + 4];  // [pixel][row]; + 4 as in pix_gemm_kernel
  __shared__ __align__(16) float Bs[BK][BN + 4];  // [pixel][col]
  __shared__ int s_n[BK], s_h[BK], s_w[BK];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int c0 = blockIdx.x * BN, r0 = blockIdx.y * BN, s = blockIdx.z;
  const int pbeg = s * chunk;
  const int pend = min(g.P, pbeg + chunk);
  const bool b_channels_fast = B.channels_contiguous();  // A stays pixel-fast (see the MMA kernel)
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int q0 = pbeg; q0 < pend; q0 += BK) {
    tile_pixels(q0, BK, g, pend, s_n, s_h, s_w);
    __syncthreads();
    for (int i = tid; i < BK * BN; i += NT) {
      const int kk = i % BK, rr = i / BK, r = r0 + rr;
      As[kk][rr] = (s_n[kk] >= 0 && r < R) ? A(r, s_n[kk], s_h[kk], s_w[kk], q0 + kk) : 0.f;
    }
    for (int i = tid; i < BK * BN; i += NT) {
      const int cc = b_channels_fast ? i % BN : i / BK, kk = b_channels_fast ? i / BN : i % BK, c = c0 + cc;
      Bs[kk][cc] = (s_n[kk] >= 0 && c < Ccols) ? B(c, s_n[kk], s_h[kk], s_w[kk], q0 + kk) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float a[4] = {av.x, av.y, av.z, av.w}, b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = r0 + ty * 4 + i;
    if (r >= R) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c0 + tx * 4 + j;
      if (c < Ccols) part[((int64_t)s * R + r) * Ccols + c] = acc[i][j];
    }
  }
}

// How many pixel splits the weight-gradient GEMM uses (and their length, a multiple of BK): enough
// blocks to fill a large GPU, but never splits shorter than 256 pixels.
inline int wgrad_splits(int R, int Ccols, int P, int* chunk) {
  const int64_t tiles = cdiv(R, BN) * cdiv(Ccols, BN);
  int64_t s = cdiv(1024, tiles);
  const int64_t smax = cdiv(P, 256);
  if (s > smax) s = smax;
  if (s > 4096) s = 4096;
  if (s < 1) s = 1;
  int64_t len = cdiv(cdiv(P, s), BK) * BK;
  *chunk = (int)len;
  return (int)cdiv(P, len);
}

// ---------------------------------------------------------------- tensor-core builds

// The MMA kernels keep the SIMT kernels' tiles, loaders and epilogues; only the product runs on
// tensor cores: operands are converted once, when the tile is staged in shared memory (TF32
// rounded to nearest, as cuDNN converts), and each of the 8 warps owns two 16x16 fragments.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define DLK_MMA 1
#else
#define DLK_MMA 0
#endif
constexpr int MMA_FRAG = 16;            // fragment rows and columns
constexpr int MMA_ROW_PAD_BYTES = 16;   // shared rows padded by 16 bytes: WMMA's ldm rule, fewer conflicts
constexpr int MMA_ACC_PAD = 4;          // floats of padding per accumulator row in shared memory
// Blocks per SM the MMA kernels are built for: a register budget of 65536 / (2 * NT) = 128.  Given
// the block size alone, ptxas (CUDA 13.0) held some of them to 31-48 registers and spilled.
constexpr int MMA_MIN_BLOCKS = 2;
// ... and with more row tiles (their accumulators and weight prefetch: at 128 registers ptxas
// spilled 100-500 bytes with 4 tiles, 16-96 with 2 of TF32; 6 tiles take up to 243): one block per
// SM.  Two 16-bit tiles fit 128 registers.
constexpr int MMA_MIN_BLOCKS_WIDE = 1;
template <Mma M, int RT>
constexpr int mma_min_blocks() { return RT == 1 || (RT == 2 && M != Mma::TF32) ? MMA_MIN_BLOCKS : MMA_MIN_BLOCKS_WIDE; }
// Output-row tiles one block of mma_pix_gemm_kernel may hold, per operand type: its A operand (a
// depthwise conv computed by the loader) is then staged once for up to this many x BN output
// channels, and the taps are computed once per pass without a plane.  Bounded by the 48 KB of
// static shared memory: the weights' double buffer grows with the tiles (36 KB at 6 x 64 rows of
// 16-bit operands, 30 KB at 3 x 64 rows of float32 TF32 ones; the accumulator tile reuses it after
// the K loop) beside the A buffers (4.5 or 8.5 KB) and the pixel and epilogue arrays (1.3 KB):
// 41.8 and 39.8 KB; the staged 3 x 3 operand (dwconv_bn_act_fwd.cu) adds its halo, 4 or 8 KB: 45.8
// and 47.8 KB.  A 4th TF32 tile would not fit; a 7th 16-bit one would only without the halo, and no
// DLKUNet level needs it (6 x 64 = 384 channels), and each build costs compile time.
template <Mma M>
__host__ __device__ constexpr int mma_max_row_tiles() { return M == Mma::F16 || M == Mma::BF16 ? 6 : M == Mma::TF32 ? 3 : 1; }
inline int max_row_tiles(Mma m) {
  return m == Mma::F16 || m == Mma::BF16 ? mma_max_row_tiles<Mma::BF16>()
         : m == Mma::TF32                ? mma_max_row_tiles<Mma::TF32>()
                                         : 1;
}

#if DLK_MMA
template <Mma M> struct MmaOperand;
template <> struct MmaOperand<Mma::TF32> {
  using Storage = float;                         // element staged in shared memory
  using Frag = nvcuda::wmma::precision::tf32;    // fragment element
  static constexpr int K = 8;                    // fragment depth
  __device__ static float cvt(float v) { return nvcuda::wmma::__float_to_tf32(v); }
};
template <> struct MmaOperand<Mma::F16> {
  using Storage = __half;
  using Frag = __half;
  static constexpr int K = 16;
  __device__ static __half cvt(float v) { return __float2half_rn(v); }
};
template <> struct MmaOperand<Mma::BF16> {
  using Storage = __nv_bfloat16;
  using Frag = __nv_bfloat16;
  static constexpr int K = 16;
  __device__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

// One warp's 16 x 32 share of a 64 x 64 output tile: two accumulator fragments side by side.
template <Mma M, class ALayout>
struct WarpTile {
  using Op = MmaOperand<M>;
  using S = typename Op::Storage;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, MMA_FRAG, MMA_FRAG, Op::K, float> acc[2];
  __device__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.f);
    nvcuda::wmma::fill_fragment(acc[1], 0.f);
  }
  // One BK-deep step.  a: the warp's 16 rows at k = 0 (row-major a[row * lda + k], or column-major
  // a[k * lda + row]); b: its 32 columns at k = 0, row-major b[k * ldb + col].
  __device__ void step(const S* a, int lda, const S* b, int ldb) {
    namespace wmma = nvcuda::wmma;
    constexpr bool a_col_major = std::is_same<ALayout, wmma::col_major>::value;
#pragma unroll
    for (int kk = 0; kk < BK; kk += Op::K) {
      wmma::fragment<wmma::matrix_a, MMA_FRAG, MMA_FRAG, Op::K, typename Op::Frag, ALayout> fa;
      wmma::load_matrix_sync(fa, a + (a_col_major ? kk * lda : kk), lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, MMA_FRAG, MMA_FRAG, Op::K, typename Op::Frag, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b + kk * ldb + j * MMA_FRAG, ldb);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
  __device__ void store(float* c, int ldc) const {
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(c + j * MMA_FRAG, acc[j], ldc, nvcuda::wmma::mem_row_major);
  }
};

// The shared memory of an MMA pixel kernel apart from any staging of its own: the operand tile (k,
// pixel; the MMA's B) and the weights (row, k; the MMA's A), both double-buffered, the weights'
// buffers holding the accumulator tile after the K loop, and the block's pixels.
template <Mma M, int RT>
struct PixGemmShared {
  using S = typename MmaOperand<M>::Storage;
  static constexpr int PAD = MMA_ROW_PAD_BYTES / (int)sizeof(S);
  static constexpr int B_BYTES = 2 * RT * BN * (BK + PAD) * (int)sizeof(S);
  static constexpr int C_BYTES = BN * (BM + MMA_ACC_PAD) * (int)sizeof(float);
  using WeightRow = S[BK + PAD];
  using AccRow = float[BM + MMA_ACC_PAD];
  __align__(32) S as[2][BK][BM + PAD];
  __align__(32) unsigned char weights_then_acc[B_BYTES > C_BYTES ? B_BYTES : C_BYTES];
  int sn[BM], sh[BM], sw[BM];
  __device__ __forceinline__ WeightRow* bs(int buf) {
    return reinterpret_cast<WeightRow*>(weights_then_acc) + buf * RT * BN;
  }
  __device__ __forceinline__ AccRow* cs() { return reinterpret_cast<AccRow*>(weights_then_acc); }
  // One K step's MMAs, from buffer buf, into the warp's share (rows wr, pixels wp) of each row tile.
  __device__ __forceinline__ void step(WarpTile<M, nvcuda::wmma::row_major> (&tile)[RT], int buf, int wr, int wp) {
#pragma unroll
    for (int t = 0; t < RT; ++t) tile[t].step(&bs(buf)[t * BN + wr][0], BK + PAD, &as[buf][0][wp], BM + PAD);
  }
};

// The weights' part of one K step of the MMA pixel kernels: rows r0 .. r0 + RT*BN - 1 of wm (row
// stride w_rs, k stride w_ks), fetched into registers a step ahead and stored (k-fast, in the MMA's
// operand type) into a shared buffer after the current step's MMAs.
template <Mma M, int RT>
struct WeightStage {
  using Op = MmaOperand<M>;
  using S = typename Op::Storage;
  static constexpr int PAD = MMA_ROW_PAD_BYTES / (int)sizeof(S);
  static constexpr int PER_THREAD = BK * BN * RT / NT;
  static_assert(PER_THREAD * NT == BK * BN * RT, "whole tiles per thread");
  float next[PER_THREAD];
  // (Offsets in 32 bits, as a weight matrix's size allows: ptxas kept 64-bit addresses of every
  // element live across the K loop and spilled.)
  __device__ __forceinline__ void fetch(const float* __restrict__ wm, int w_rs, int w_ks, int r0, int rows,
                                        int kdim, int k0) {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int i = threadIdx.x + j * NT, k = k0 + i % BK, r = r0 + i / BK;
      next[j] = (r < rows && k < kdim) ? __ldg(wm + (r * w_rs + k * w_ks)) : 0.f;
    }
  }
  __device__ __forceinline__ void stash(S (*bs)[BK + PAD]) const {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int i = threadIdx.x + j * NT;
      bs[i / BK][i % BK] = Op::cvt(next[j]);
    }
  }
};

// The end of both MMA pixel kernels: each of the RT accumulator tiles through shared memory (cs,
// which may alias the weights' buffers once the K loop's last barrier has passed) into the
// epilogue, whole (WholeTileEpilogue) or as the per-thread 4 x 4 of the epilogue contract.
template <Mma M, int RT, class Epi>
__device__ __forceinline__ void finish_row_tiles(const WarpTile<M, nvcuda::wmma::row_major> (&tile)[RT],
                                                 float (*cs)[BM + MMA_ACC_PAD], int wr, int wp, int p0, int r0,
                                                 int rows, const int* s_n, const int* s_h, const int* s_w,
                                                 const Epi& epi) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int t = 0; t < RT; ++t) {
    const int rt0 = r0 + t * BN;
    if (rt0 >= rows) break;  // (uniform over the block)
    tile[t].store(&cs[wr][wp], BM + MMA_ACC_PAD);
    __syncthreads();
    if constexpr (WholeTileEpilogue<Epi>::value) {
      epi.tile(&cs[0][0], BM + MMA_ACC_PAD, p0, rt0, s_n, s_h, s_w);
    } else {
      const int tx = tid & 15, ty = tid >> 4;
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = cs[ty * 4 + j][tx + 16 * i];
      epi(acc, tx, ty, p0, rt0, s_n, s_h, s_w);
    }
    __syncthreads();  // the epilogue has read cs before the next tile overwrites it
  }
}
#endif

// pix_gemm_kernel on tensor cores.  Warp w owns rows 16*(w/2) and pixels 32*(w%2) .. +31 of each
// of the block's RT row tiles (RT x BN output channels on one BM-pixel A tile, staged once); the
// accumulators go through shared memory, one row tile at a time, into the epilogue.
// Double-buffered: each thread fetches (loads or computes) its share of the next K step into
// registers before the MMAs of the current one and stores it into the other buffer after them, so
// the operand loads' latency overlaps the tensor cores and a step needs one barrier, not two.
template <Mma M, int RT, class ALoad, class Epi>
__global__ void __launch_bounds__(NT, mma_min_blocks<M, RT>())
    mma_pix_gemm_kernel(ALoad A, const float* __restrict__ wm, int64_t w_rs, int64_t w_ks, int rows, int kdim, Geo g,
                        Epi epi) {
#if DLK_MMA
  using Op = MmaOperand<M>;
  using S = typename Op::Storage;
  static_assert(RT >= 1 && RT <= mma_max_row_tiles<M>(), "row tiles within the shared-memory budget");
  constexpr int A_PER_THREAD = BK * BM / NT;
  static_assert(A_PER_THREAD * NT == BK * BM, "whole tiles per thread");
  __shared__ PixGemmShared<M, RT> sm;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int p0 = blockIdx.x * BM, r0 = blockIdx.y * BN * RT;
  const int wr = (warp >> 1) * MMA_FRAG, wp = (warp & 1) * 2 * MMA_FRAG;
  const bool channels_fast = A.channels_contiguous();
  const int *s_n = sm.sn, *s_h = sm.sh, *s_w = sm.sw;
  tile_pixels(p0, BM, g, g.P, sm.sn, sm.sh, sm.sw);
  __syncthreads();
  WarpTile<M, nvcuda::wmma::row_major> tile[RT];
#pragma unroll
  for (int t = 0; t < RT; ++t) tile[t].zero();

  // Element j of this thread's share: consecutive threads on consecutive channels where A's
  // channels are contiguous, else on consecutive pixels (for_each_in_tile's rule).
  auto a_at = [&](int j, int& kk, int& pp) {
    const int i = tid + j * NT;
    kk = channels_fast ? i % BK : i / BM;
    pp = channels_fast ? i / BK : i % BM;
  };
  float a_next[A_PER_THREAD];
  WeightStage<M, RT> weights;
  auto fetch = [&](int k0) {
#pragma unroll
    for (int j = 0; j < A_PER_THREAD; ++j) {
      int kk, pp;
      a_at(j, kk, pp);
      const int k = k0 + kk;
      a_next[j] = (k < kdim && s_n[pp] >= 0) ? A(k, s_n[pp], s_h[pp], s_w[pp], p0 + pp) : 0.f;
    }
    weights.fetch(wm, (int)w_rs, (int)w_ks, r0, rows, kdim, k0);
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int j = 0; j < A_PER_THREAD; ++j) {
      int kk, pp;
      a_at(j, kk, pp);
      sm.as[buf][kk][pp] = Op::cvt(a_next[j]);
    }
    weights.stash(sm.bs(buf));
  };

  fetch(0);
  stash(0);
  __syncthreads();
  int buf = 0;
  for (int k0 = 0; k0 < kdim; k0 += BK) {
    const bool more = k0 + BK < kdim;
    if (more) fetch(k0 + BK);
    sm.step(tile, buf, wr, wp);
    // The other buffer was last read in the previous step, which the barrier below it closed.
    if (more) stash(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }
  // (The loop's last barrier closed every read of the weights: the accumulators may overwrite them.)
  finish_row_tiles<M, RT>(tile, sm.cs(), wr, wp, p0, r0, rows, s_n, s_h, s_w, epi);
#else
  __trap();  // never launched: the launchers pick Mma::FP32 below compute capability 8.0
#endif
}

// wgrad_gemm_kernel on tensor cores: the A tile is staged [pixel][row], i.e. the MMA's A in
// column-major order; warp w owns rows 16*(w/2) and columns 32*(w%2) .. +31.
// Column `sum_col` (or none when negative) has B = 1 everywhere: a bias gradient, i.e. the row sums
// of A.  Those are taken in float32 from A before rounding, as exact as eager's separate reduction.
// Double-buffered as mma_pix_gemm_kernel.  The pixels' coordinates change every step, so they are
// computed two steps ahead into a third pair of buffers: the step after next's into the buffer
// whose pixels the next step's fetch no longer needs, published by the same one barrier per step.
template <Mma M, class ALoad, class BLoad>
__global__ void __launch_bounds__(NT, MMA_MIN_BLOCKS)
    mma_wgrad_gemm_kernel(ALoad A, BLoad B, int R, int Ccols, int sum_col, int chunk, Geo g, float* __restrict__ part) {
#if DLK_MMA
  using Op = MmaOperand<M>;
  using S = typename Op::Storage;
  constexpr int PAD = MMA_ROW_PAD_BYTES / (int)sizeof(S);
  constexpr int PER_THREAD = BK * BN / NT;  // elements of each operand a thread stages per step
  static_assert(PER_THREAD * NT == BK * BN, "whole tiles per thread");
  __shared__ __align__(32) S As[2][BK][BN + PAD];  // [pixel][row]
  __shared__ __align__(32) S Bs[2][BK][BN + PAD];  // [pixel][col]
  __shared__ __align__(32) float Cs[BN][BN + MMA_ACC_PAD];
  __shared__ int s_n[2][BK], s_h[2][BK], s_w[2][BK];
  const int tid = threadIdx.x, warp = tid >> 5;
  const int c0 = blockIdx.x * BN, r0 = blockIdx.y * BN, s = blockIdx.z;
  const int wr = (warp >> 1) * MMA_FRAG, wc = (warp & 1) * 2 * MMA_FRAG;
  const int pbeg = s * chunk;
  const int pend = min(g.P, pbeg + chunk);
  WarpTile<M, nvcuda::wmma::col_major> tile;
  tile.zero();
  // Thread t stages rows t/BK + j*(NT/BK) of every step: their unrounded sums (for sum_col).  So A
  // is staged pixel-fast in every layout; B follows its layout.
  const bool b_channels_fast = B.channels_contiguous();
  float row_sum[PER_THREAD] = {};

  float a_next[PER_THREAD], b_next[PER_THREAD];
  auto b_at = [&](int j, int& kk, int& cc) {
    const int i = tid + j * NT;
    cc = b_channels_fast ? i % BN : i / BK;
    kk = b_channels_fast ? i / BN : i % BK;
  };
  auto fetch = [&](int q0, int cb) {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int i = tid + j * NT, kk = i % BK, r = r0 + i / BK;
      const int n = s_n[cb][kk];
      a_next[j] = (n >= 0 && r < R) ? A(r, n, s_h[cb][kk], s_w[cb][kk], q0 + kk) : 0.f;
      row_sum[j] += a_next[j];
    }
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      int kk, cc;
      b_at(j, kk, cc);
      const int n = s_n[cb][kk], c = c0 + cc;
      b_next[j] = (n >= 0 && c < Ccols) ? B(c, n, s_h[cb][kk], s_w[cb][kk], q0 + kk) : 0.f;
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int i = tid + j * NT;
      As[buf][i % BK][i / BK] = Op::cvt(a_next[j]);
    }
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      int kk, cc;
      b_at(j, kk, cc);
      Bs[buf][kk][cc] = Op::cvt(b_next[j]);
    }
  };

  tile_pixels(pbeg, BK, g, pend, s_n[0], s_h[0], s_w[0]);
  tile_pixels(pbeg + BK, BK, g, pend, s_n[1], s_h[1], s_w[1]);
  __syncthreads();
  fetch(pbeg, 0);
  stash(0);
  __syncthreads();
  int buf = 0;
  for (int q0 = pbeg; q0 < pend; q0 += BK) {
    const bool more = q0 + BK < pend;
    if (more) fetch(q0 + BK, buf ^ 1);
    tile.step(&As[buf][0][wr], BN + PAD, &Bs[buf][0][wc], BN + PAD);
    // The other operand buffers were last read in the previous step, which the barrier below it
    // closed; this step's pixels were last read by the fetch before it.
    if (more) stash(buf ^ 1);
    tile_pixels(q0 + 2 * BK, BK, g, pend, s_n[buf], s_h[buf], s_w[buf]);
    __syncthreads();
    buf ^= 1;
  }
  tile.store(&Cs[wr][wc], BN + MMA_ACC_PAD);
  __syncthreads();
  // The BK threads staging a row are 16 consecutive lanes (BK == 16): sum16 adds their parts.
  static_assert(BK == 16, "row sums reduce over 16 lanes");
  const bool has_sum_col = sum_col >= c0 && sum_col < c0 + BN;
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) {
    const float total = sum16(row_sum[j]);
    if (has_sum_col && tid % BK == 0) Cs[(tid + j * NT) / BK][sum_col - c0] = total;
  }
  __syncthreads();
  for (int i = tid; i < BN * BN; i += NT) {
    const int rr = i / BN, cc = i % BN, r = r0 + rr, c = c0 + cc;
    if (r < R && c < Ccols) part[((int64_t)s * R + r) * Ccols + c] = Cs[rr][cc];
  }
#else
  __trap();
#endif
}

// The GEMM launchers for a mode known at compile time (callers inside with_mma), and for one chosen
// at run time.  RT: output-row tiles per block (tensor-core modes, up to mma_max_row_tiles).
template <Mma M, int RT = 1, class ALoad, class Epi>
void launch_pix_gemm_as(const ALoad& A, const float* wm, int64_t w_rs, int64_t w_ks, int rows, int kdim, Geo g,
                        const Epi& epi, cudaStream_t stream) {
  const dim3 grid((unsigned)cdiv(g.P, BM), (unsigned)cdiv(rows, BN * RT));
  if constexpr (M == Mma::FP32) {
    static_assert(RT == 1, "the fp32 kernel holds one row tile");
    pix_gemm_kernel<ALoad, Epi><<<grid, NT, 0, stream>>>(A, wm, w_rs, w_ks, rows, kdim, g, epi);
  } else {
    mma_pix_gemm_kernel<M, RT, ALoad, Epi><<<grid, NT, 0, stream>>>(A, wm, w_rs, w_ks, rows, kdim, g, epi);
  }
}

template <class T, class ALoad, class Epi>
void launch_pix_gemm(Mma mode, const ALoad& A, const float* wm, int64_t w_rs, int64_t w_ks, int rows, int kdim,
                     Geo g, const Epi& epi, cudaStream_t stream) {
  with_mma<T>(mode, [&](auto m) {
    launch_pix_gemm_as<decltype(m)::value>(A, wm, w_rs, w_ks, rows, kdim, g, epi, stream);
  });
}

// sum_col: as in mma_wgrad_gemm_kernel (the fp32 kernel computes every column exactly anyway).
template <Mma M, class ALoad, class BLoad>
void launch_wgrad_as(const ALoad& A, const BLoad& B, int R, int Ccols, int sum_col, Geo g, float* part,
                     cudaStream_t stream) {
  int chunk = 0;
  const int S = wgrad_splits(R, Ccols, g.P, &chunk);
  const dim3 grid((unsigned)cdiv(Ccols, BN), (unsigned)cdiv(R, BN), (unsigned)S);
  if constexpr (M == Mma::FP32)
    wgrad_gemm_kernel<ALoad, BLoad><<<grid, NT, 0, stream>>>(A, B, R, Ccols, chunk, g, part);
  else
    mma_wgrad_gemm_kernel<M, ALoad, BLoad><<<grid, NT, 0, stream>>>(A, B, R, Ccols, sum_col, chunk, g, part);
}

template <class T, class ALoad, class BLoad>
void launch_wgrad(Mma mode, const ALoad& A, const BLoad& B, int R, int Ccols, int sum_col, Geo g, float* part,
                  cudaStream_t stream) {
  with_mma<T>(mode, [&](auto m) {
    launch_wgrad_as<decltype(m)::value>(A, B, R, Ccols, sum_col, g, part, stream);
  });
}

// plane(c, p) = A(c, p): the loader's operand (a depthwise conv) computed once into a plane of S
// (PlaneOf), for GEMMs that would otherwise recompute it once per row tile (or per pass).  Pixel-major [P][C]
// for channels_last inputs, else channel-major [C][P]: threads follow the plane's order, so the
// loads of x (same layout) and the stores both coalesce.
template <class ALoad, class S>
__global__ void __launch_bounds__(256) plane_kernel(ALoad A, Geo g, int C, bool pixel_major_order,
                                                    S* __restrict__ plane) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)C * g.P) return;
  int c, p;
  if (pixel_major_order) {
    p = (int)(idx / C);
    c = (int)(idx - (int64_t)p * C);
  } else {
    c = (int)(idx / g.P);
    p = (int)(idx - (int64_t)c * g.P);
  }
  const int t = p / g.W;
  plane[idx] = from_f<S>(A(c, t / g.H, t % g.H, p - t * g.W, p));
}

// Writes the plane and returns the loader that reads it.
template <class ALoad, class S>
LoadPlane<S> launch_plane(const ALoad& A, bool pixel_major_order, Geo g, int C, S* plane, cudaStream_t stream) {
  plane_kernel<ALoad, S><<<(unsigned)cdiv((int64_t)C * g.P, 256), 256, 0, stream>>>(A, g, C, pixel_major_order,
                                                                                     plane);
  return pixel_major_order ? pixel_major(plane, C) : channel_major(plane, g.P, C);
}

// The element type of a plane that only GEMMs of mode M read: their operand type for 16-bit MMAs
// (rounding there is the MMA's own, so nothing changes but half the bytes), else float32.
template <Mma M, class T>
using PlaneOf = std::conditional_t<M == Mma::F16 || M == Mma::BF16, T, float>;

// out[r][c] (c < cols_main) and extra[r][c - cols_main] (c >= cols_main) = sum_s part[s][r][c].
__global__ void reduce_splits_kernel(const float* __restrict__ part, int S, int64_t M, int cols, int cols_main,
                                     float* __restrict__ out, float* __restrict__ extra) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= M) return;
  double s = 0.0;
  for (int k = 0; k < S; ++k) s += (double)part[k * M + i];
  const int64_t r = i / cols;
  const int c = (int)(i - r * cols);
  if (c < cols_main)
    out[r * cols_main + c] = (float)s;
  else
    extra[r * (cols - cols_main) + (c - cols_main)] = (float)s;
}

inline void launch_reduce_splits(const float* part, int S, int64_t M, int cols, int cols_main, float* out,
                                 float* extra, cudaStream_t stream) {
  reduce_splits_kernel<<<(unsigned)cdiv(M, 256), 256, 0, stream>>>(part, S, M, cols, cols_main, out, extra);
}

// v[j] += sum_{ky, kx} w[ky * K + kx] * src[D * ky * ld + j + D * kx], j < G: G adjacent outputs of a
// K x K correlation with dilation D over a shared-memory tile of row stride ld, src at the first
// output's first tap.  Neighbouring outputs share their reads.
template <int K, int G>
__device__ __forceinline__ void correlate_rows(const float* src, int ld, int D, const float (&w)[K * K],
                                               float (&v)[G]) {
#pragma unroll
  for (int ky = 0; ky < K; ++ky) {
    const float* row = src + D * ky * ld;
#pragma unroll
    for (int kx = 0; kx < K; ++kx)
#pragma unroll
      for (int j = 0; j < G; ++j) v[j] = fmaf(w[ky * K + kx], row[j + D * kx], v[j]);
  }
}

// ---------------------------------------------------------------- depthwise backward

// Gradient w.r.t. the input of a depthwise conv (k x k, dilation dil, 'same' padding):
// out(c, q) = extra[c][q] + sum_taps w[c][tap] * gin[c][q - dil * (tap - k/2)], q inside the image.
// gin and extra are channel-major planes (the backwards keep them in the input's dtype, as eager does).
template <int K, class G, class E, class Out>
__global__ void __launch_bounds__(256) dw_bwd_input_kernel(const G* __restrict__ gin, const float* __restrict__ w,
                                                           int k_rt, int dil, Geo g, int C, const E* __restrict__ extra,
                                                           Out out) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)C * g.P) return;
  const int c = (int)(idx / g.P);
  const int p = (int)(idx - (int64_t)c * g.P);
  const int t = p / g.W, wo = p - t * g.W, h = t % g.H, n = t / g.H;
  const int k = K > 0 ? K : k_rt, r = k / 2;
  const G* gc = gin + (int64_t)c * g.P + (int64_t)n * g.H * g.W;
  const float* wc = w + (int64_t)c * k * k;
  float acc = extra ? to_f(extra[idx]) : 0.f;
#pragma unroll
  for (int ky = 0; ky < (K > 0 ? K : k); ++ky) {
    const int hh = h - dil * (ky - r);
    if (hh < 0 || hh >= g.H) continue;
#pragma unroll
    for (int kx = 0; kx < (K > 0 ? K : k); ++kx) {
      const int ww = wo - dil * (kx - r);
      if (ww < 0 || ww >= g.W) continue;
      acc = fmaf(__ldg(wc + ky * k + kx), to_f(gc[hh * g.W + ww]), acc);
    }
  }
  out(c, n, h, wo, p, acc);
}

// The same for specialised sizes K, one block per (channel, 16 x 64 tile, image): the tile of gin
// plus its halo (dil * K/2 on each side) is loaded once, with coalesced row loads, into shared
// memory, and each thread computes 4 adjacent outputs from there with the channel's (flipped)
// weights in registers: one global load per element and halo instead of K * K from L1.
constexpr int DW_BWD_TH = 16, DW_BWD_TW = 64, DW_BWD_OUT_PER_THREAD = 4, DW_BWD_THREADS = 256;
static_assert(DW_BWD_TH * DW_BWD_TW == DW_BWD_OUT_PER_THREAD * DW_BWD_THREADS, "one output group per thread");

inline int64_t dw_bwd_smem_bytes(int k, int dil) {
  const int halo = dil * (k / 2);
  return (int64_t)sizeof(float) * (DW_BWD_TH + 2 * halo) * (DW_BWD_TW + 2 * halo);
}

template <int K, class G, class E, class Out>
__global__ void __launch_bounds__(DW_BWD_THREADS) dw_bwd_input_tiled_kernel(const G* __restrict__ gin,
                                                                            const float* __restrict__ w, int dil,
                                                                            Geo g, int tiles_w,
                                                                            const E* __restrict__ extra, Out out) {
  static_assert(K > 0, "specialised sizes only");
  extern __shared__ float smem[];
  constexpr int G4 = DW_BWD_OUT_PER_THREAD;
  const int halo = dil * (K / 2);
  const int SW = DW_BWD_TW + 2 * halo, SH = DW_BWD_TH + 2 * halo;
  const int c = blockIdx.x, n = blockIdx.z;
  const int h0 = (blockIdx.y / tiles_w) * DW_BWD_TH, w0 = (blockIdx.y % tiles_w) * DW_BWD_TW;
  const int H = g.H, W = g.W;
  const int64_t plane = (int64_t)c * g.P + (int64_t)n * H * W;
  for (int i = threadIdx.x; i < SH * SW; i += DW_BWD_THREADS) {
    const int gh = h0 - halo + i / SW, gw = w0 - halo + i % SW;
    smem[i] = gh >= 0 && gh < H && gw >= 0 && gw < W ? to_f(gin[plane + gh * W + gw]) : 0.f;
  }
  // out(q) = sum_taps w[tap] * gin[q - dil * (tap - K/2)]: a correlation with the flipped kernel.
  float wf[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) wf[t] = __ldg(w + (int64_t)c * K * K + (K * K - 1 - t));
  __syncthreads();
  const int oy = threadIdx.x / (DW_BWD_TW / G4), ox0 = (threadIdx.x % (DW_BWD_TW / G4)) * G4;
  float v[G4] = {};
  correlate_rows<K, G4>(smem + oy * SW + ox0, SW, dil, wf, v);
  const int gh = h0 + oy;
#pragma unroll
  for (int j = 0; j < G4; ++j) {
    const int gw = w0 + ox0 + j;
    if (gh >= H || gw >= W) continue;
    const int64_t idx = plane + gh * W + gw;
    out(c, n, gh, gw, (n * H + gh) * W + gw, v[j] + (extra ? to_f(extra[idx]) : 0.f));
  }
}

template <int K, class G, class E, class Out>
void launch_dw_bwd_input(const G* gin, const float* w, int k, int dil, Geo g, int C, const E* extra, const Out& out,
                         cudaStream_t stream) {
  if constexpr (K > 0) {
    const int64_t smem = dw_bwd_smem_bytes(K, dil);
    const int tiles_w = (int)cdiv(g.W, DW_BWD_TW);
    const int64_t tiles = cdiv(g.H, DW_BWD_TH) * tiles_w;
    if (smem <= STATIC_SMEM_BYTES && tiles <= MAX_GRID_YZ) {
      const dim3 grid((unsigned)C, (unsigned)tiles, (unsigned)g.N);
      dw_bwd_input_tiled_kernel<K, G, E, Out><<<grid, DW_BWD_THREADS, (size_t)smem, stream>>>(gin, w, dil, g, tiles_w,
                                                                                           extra, out);
      return;
    }
  }
  const int64_t total = (int64_t)C * g.P;
  dw_bwd_input_kernel<K, G, E, Out><<<(unsigned)cdiv(total, 256), 256, 0, stream>>>(gin, w, k, dil, g, C, extra, out);
}

template <class T>
struct SrcAct {
  Act<T> x;
  __device__ __forceinline__ float operator()(int n, int c, int h, int w) const { return x.load(n, c, h, w); }
};
template <class S>
struct SrcPlane {  // a channel-major plane of S
  const S* __restrict__ d;
  int64_t P;
  int H, W;
  __device__ __forceinline__ float operator()(int n, int c, int h, int w) const {
    return to_f(d[c * P + ((int64_t)n * H + h) * W + w]);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Weight and bias gradients of a depthwise conv, one block per (channel, pixel split[, tap]):
// part[s][c][tap] = sum_p gin[c][p] * src(c, p + dil * (tap - k/2)), part[s][c][k*k] = sum_p gin[c][p].
// Specialised K keeps all taps in registers; the generic path (K = 0) gives each tap its own
// block (blockIdx.z) and lets block z = 0 also sum the bias.
template <int K, class G, class Src>
__global__ void __launch_bounds__(256) dw_bwd_weight_kernel(const G* __restrict__ gin, Src src, int k_rt, int dil,
                                                            Geo g, int C, int chunk, float* __restrict__ part) {
  constexpr int NTAP = K > 0 ? K * K : 1;
  const int k = K > 0 ? K : k_rt, r = k / 2, taps = k * k;
  const int c = blockIdx.x, s = blockIdx.y, tap0 = K > 0 ? 0 : (int)blockIdx.z;
  const int pbeg = s * chunk, pend = min(g.P, pbeg + chunk);
  const G* gc = gin + (int64_t)c * g.P;
  float acc[NTAP + 1];
#pragma unroll
  for (int t = 0; t <= NTAP; ++t) acc[t] = 0.f;
  for (int p = pbeg + (int)threadIdx.x; p < pend; p += 256) {
    const int t2 = p / g.W, wo = p - t2 * g.W, h = t2 % g.H, n = t2 / g.H;
    const float gv = to_f(gc[p]);
    acc[NTAP] += gv;
    if (K > 0) {
      constexpr int KK = K > 0 ? K : 1;
#pragma unroll
      for (int ky = 0; ky < KK; ++ky) {
        const int hh = h + dil * (ky - r);
        if (hh < 0 || hh >= g.H) continue;
#pragma unroll
        for (int kx = 0; kx < KK; ++kx) {
          const int ww = wo + dil * (kx - r);
          if (ww >= 0 && ww < g.W) acc[ky * KK + kx] = fmaf(gv, src(n, c, hh, ww), acc[ky * KK + kx]);
        }
      }
    } else {
      const int ky = tap0 / k, kx = tap0 - ky * k;
      const int hh = h + dil * (ky - r), ww = wo + dil * (kx - r);
      if (hh >= 0 && hh < g.H && ww >= 0 && ww < g.W) acc[0] = fmaf(gv, src(n, c, hh, ww), acc[0]);
    }
  }
  __shared__ float red[8][NTAP + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t <= NTAP; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) red[warp][t] = v;
  }
  __syncthreads();
  for (int t = threadIdx.x; t <= NTAP; t += 256) {
    float v = 0.f;
#pragma unroll
    for (int w8 = 0; w8 < 8; ++w8) v += red[w8][t];
    float* dst = part + ((int64_t)s * C + c) * (taps + 1);
    if (t < NTAP)
      dst[tap0 + t] = v;
    else if (tap0 == 0)
      dst[taps] = v;
  }
}

inline int dw_weight_splits(int C, int P, int* chunk) {
  int64_t s = cdiv(2048, C);
  const int64_t smax = cdiv(P, 1024);
  if (s > smax) s = smax;
  if (s > 65535) s = 65535;
  if (s < 1) s = 1;
  const int64_t len = cdiv(P, s);
  *chunk = (int)len;
  return (int)cdiv(P, len);
}

inline int64_t dw_weight_workspace(int C, int P, int k) {
  int chunk = 0;
  return (int64_t)dw_weight_splits(C, P, &chunk) * C * (k * k + 1);
}

// Writes grad_w (C, k*k) and grad_b (C) from gin (plane) and src; `part` holds dw_weight_workspace floats.
template <int K, class G, class Src>
void launch_dw_bwd_weight(const G* gin, const Src& src, int k, int dil, Geo g, int C, float* part,
                          float* grad_w, float* grad_b, cudaStream_t stream) {
  int chunk = 0;
  const int S = dw_weight_splits(C, g.P, &chunk);
  dim3 grid((unsigned)C, (unsigned)S, K > 0 ? 1u : (unsigned)(k * k));
  dw_bwd_weight_kernel<K, G, Src><<<grid, 256, 0, stream>>>(gin, src, k, dil, g, C, chunk, part);
  launch_reduce_splits(part, S, (int64_t)C * (k * k + 1), k * k + 1, k * k, grad_w, grad_b, stream);
}

// ---------------------------------------------------------------- LKA depthwise stages

// a1 = dw(x, w0, b0) (k0 x k0), a2 = dw(a1, ws, bs) (ks x ks, dilation d), for one (n, c) and a
// TH x TW output tile.  Shared memory holds the x tile with both halos (r2 + r0) and the a1 tile
// with its dilated halo (r2); a1 is zero outside the image, exactly as two separate convolutions
// with zero padding see it.  Writes a2 as a plane of S (PlaneOf: the GEMMs that read it round it
// to their operand type anyway) and, when a1_out is set, a1 as a plane of T (for the backward).
// Specialised sizes (K0, KS, D > 0) use 64-wide tiles and give each thread 4 horizontally adjacent
// outputs with the weights in registers, so neighbouring outputs share their shared-memory reads;
// the generic path (all 0) computes one output per step from 32-wide tiles.
constexpr int LKA_TH = 16, LKA_TW_SPEC = 64, LKA_TW_GENERIC = 32;
inline int lka_tile_w(bool specialised) { return specialised ? LKA_TW_SPEC : LKA_TW_GENERIC; }

inline int64_t lka_stage_smem_floats(int k0, int ks, int d, int tw) {
  const int r0 = k0 / 2, r2 = d * (ks / 2);
  const int64_t AH = LKA_TH + 2 * r2, AW = tw + 2 * r2;
  return (AH + 2 * r0) * (AW + 2 * r0) + AH * AW;
}

// Where a block's lka tile lies: output rows h0 .. h0 + LKA_TH - 1, columns wb .. wb + TW - 1 of one
// image, whose channel c starts at plane + c * P in the planes the stages write.
struct LkaTile {
  int h0, wb, H, W;
  int64_t plane;
};

// Stage 1 of the specialised sizes: a1 (k0 x k0 conv of the x tile xs, row stride XW, its element
// type X) over the AH x AW tile plus the dilated halo r2, G adjacent columns per thread, into `as`
// (zero outside the image, as the second conv's padding); a1's own tile also to a1_out when set.
template <int K0, int G, class X, class A1>
__device__ __forceinline__ void lka_stage_a1(const X* xs, int XW, float* as, int AH, int AW, int r2, int TW,
                                             const float (&w0r)[K0 * K0], float bias, const LkaTile& t,
                                             A1* a1_out) {
  const int groups = (AW + G - 1) / G;
  for (int i = threadIdx.x; i < AH * groups; i += blockDim.x) {
    const int ay = i / groups, ax0 = (i - ay * groups) * G;
    const int gh = t.h0 - r2 + ay;
    float v[G];
#pragma unroll
    for (int j = 0; j < G; ++j) v[j] = bias;
#pragma unroll
    for (int ky = 0; ky < K0; ++ky) {
      const X* row = xs + (ay + ky) * XW + ax0;
      float xr[G + K0 - 1];
#pragma unroll
      for (int q = 0; q < G + K0 - 1; ++q) xr[q] = ax0 + q < XW ? to_f(row[q]) : 0.f;  // last group may overhang
#pragma unroll
      for (int kx = 0; kx < K0; ++kx)
#pragma unroll
        for (int j = 0; j < G; ++j) v[j] = fmaf(w0r[ky * K0 + kx], xr[j + kx], v[j]);
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const int ax = ax0 + j, gw = t.wb - r2 + ax;
      if (ax >= AW) continue;
      const bool inside = gh >= 0 && gh < t.H && gw >= 0 && gw < t.W;
      as[ay * AW + ax] = inside ? v[j] : 0.f;
      if (a1_out && inside && ay >= r2 && ay < r2 + LKA_TH && ax >= r2 && ax < r2 + TW)
        a1_out[t.plane + gh * t.W + gw] = from_f<A1>(v[j]);
    }
  }
}

// Stage 2 of the specialised sizes: a2 (ks x ks conv, dilation D, of the a1 tile) over the output
// tile, G adjacent columns per thread (TW is a multiple of G: every read stays inside the a1 tile).
template <int KS, int D, int G, class S>
__device__ __forceinline__ void lka_stage_a2(const float* as, int AW, int TW, const float (&wsr)[KS * KS], float bias,
                                             const LkaTile& t, S* a2_out) {
  for (int i = threadIdx.x; i < LKA_TH * (TW / G); i += blockDim.x) {
    const int oy = i / (TW / G), ox0 = (i - oy * (TW / G)) * G;
    float v[G];
#pragma unroll
    for (int j = 0; j < G; ++j) v[j] = bias;
    correlate_rows<KS, G>(as + oy * AW + ox0, AW, D, wsr, v);
    const int gh = t.h0 + oy;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const int gw = t.wb + ox0 + j;
      if (gh < t.H && gw < t.W) a2_out[t.plane + gh * t.W + gw] = from_f<S>(v[j]);
    }
  }
}

constexpr int LKA_OUT_PER_THREAD = 4;  // the specialised stages' G

template <class T, class S, int K0, int KS, int D>
__global__ void __launch_bounds__(256, 2) lka_stage_kernel(Act<T> x, const float* __restrict__ w0,
                                                           const float* __restrict__ b0, const float* __restrict__ ws,
                                                           const float* __restrict__ bs, int k0_rt, int ks_rt,
                                                           int d_rt, Geo g, int tiles_w, T* __restrict__ a1_out,
                                                           S* __restrict__ a2_out) {
  constexpr bool SPEC = K0 > 0;
  constexpr int TW = SPEC ? LKA_TW_SPEC : LKA_TW_GENERIC;
  extern __shared__ float smem[];
  const int k0 = SPEC ? K0 : k0_rt, ks = SPEC ? KS : ks_rt, d = SPEC ? D : d_rt;
  const int r0 = k0 / 2, r2 = d * (ks / 2);
  const int AH = LKA_TH + 2 * r2, AW = TW + 2 * r2, XW = AW + 2 * r0, XH = AH + 2 * r0;
  float* xs = smem;
  float* as = smem + XH * XW;
  // Channels vary fastest over the grid: blocks running together share x's sectors when x is
  // channels_last (a channel's tile alone uses 4 of each 32 bytes it loads).
  const int c = blockIdx.x, n = blockIdx.z;
  const int H = g.H, W = g.W;
  const LkaTile t{(int)(blockIdx.y / tiles_w) * LKA_TH, (int)(blockIdx.y % tiles_w) * TW, H, W,
                  (int64_t)c * g.P + (int64_t)n * H * W};

  for (int i = threadIdx.x; i < XH * XW; i += 256) {
    const int yy = i / XW, xx = i - yy * XW;
    const int gh = t.h0 - r2 - r0 + yy, gw = t.wb - r2 - r0 + xx;
    xs[i] = (gh >= 0 && gh < H && gw >= 0 && gw < W) ? x.load(n, c, gh, gw) : 0.f;
  }
  if constexpr (SPEC) {
    float w0r[K0 * K0];
#pragma unroll
    for (int q = 0; q < K0 * K0; ++q) w0r[q] = __ldg(w0 + (int64_t)c * K0 * K0 + q);
    __syncthreads();
    lka_stage_a1<K0, LKA_OUT_PER_THREAD>(xs, XW, as, AH, AW, r2, TW, w0r, b0[c], t, a1_out);
    float wsr[KS * KS];
#pragma unroll
    for (int q = 0; q < KS * KS; ++q) wsr[q] = __ldg(ws + (int64_t)c * KS * KS + q);
    __syncthreads();
    lka_stage_a2<KS, D, LKA_OUT_PER_THREAD>(as, AW, TW, wsr, bs[c], t, a2_out);
  } else {  // one output per step, weights from L1
    __syncthreads();
    const float* w0c = w0 + (int64_t)c * k0 * k0;
    for (int i = threadIdx.x; i < AH * AW; i += 256) {
      const int ay = i / AW, ax = i - ay * AW;
      const int gh = t.h0 - r2 + ay, gw = t.wb - r2 + ax;
      float v = b0[c];
      for (int ky = 0; ky < k0; ++ky)
        for (int kx = 0; kx < k0; ++kx) v = fmaf(__ldg(w0c + ky * k0 + kx), xs[(ay + ky) * XW + ax + kx], v);
      const bool inside = gh >= 0 && gh < H && gw >= 0 && gw < W;
      as[i] = inside ? v : 0.f;
      if (a1_out && inside && ay >= r2 && ay < r2 + LKA_TH && ax >= r2 && ax < r2 + TW)
        a1_out[t.plane + gh * W + gw] = from_f<T>(v);
    }
    __syncthreads();
    const float* wsc = ws + (int64_t)c * ks * ks;
    for (int i = threadIdx.x; i < LKA_TH * TW; i += 256) {
      const int oy = i / TW, ox = i - oy * TW;
      float v = bs[c];
      for (int ky = 0; ky < ks; ++ky)
        for (int kx = 0; kx < ks; ++kx)
          v = fmaf(__ldg(wsc + ky * ks + kx), as[(oy + d * ky) * AW + ox + d * kx], v);
      const int gh = t.h0 + oy, gw = t.wb + ox;
      if (gh < H && gw < W) a2_out[t.plane + gh * W + gw] = from_f<S>(v);
    }
  }
}

// The stages for channels_last x whose channels can be read 16 bytes at a time (8 16-bit or 4
// float32 channels, C a multiple of that): a block loads those channels at each pixel of its tile
// with one load, spreads them over one plane per channel (x's dtype, shared memory), then runs the
// two stages channel after channel.  A one-channel block would use 2-4 bytes of each 32-byte sector
// it reads from L2.  32-wide tiles keep CB planes within 48 KB (their halos cost more a1 taps:
// 1.2x per output for (5, 7, 3)).
constexpr int LKA_TW_CL = 32;
template <class T>
__host__ __device__ constexpr int lka_cl_channels() { return STAGE_BYTES / (int)sizeof(T); }

template <class T, int K0, int KS, int D>
constexpr int64_t lka_stage_cl_smem_bytes() {
  constexpr int r0 = K0 / 2, r2 = D * (KS / 2);
  constexpr int64_t AH = LKA_TH + 2 * r2, AW = LKA_TW_CL + 2 * r2;
  return lka_cl_channels<T>() * (AH + 2 * r0) * (AW + 2 * r0) * (int64_t)sizeof(T) + AH * AW * (int64_t)sizeof(float);
}

template <class T, class S, int K0, int KS, int D>
__global__ void __launch_bounds__(256, 2) lka_stage_cl_kernel(Act<T> x, const float* __restrict__ w0,
                                                              const float* __restrict__ b0,
                                                              const float* __restrict__ ws,
                                                              const float* __restrict__ bs, Geo g, int tiles_w,
                                                              T* __restrict__ a1_out, S* __restrict__ a2_out) {
  constexpr int CB = lka_cl_channels<T>(), TW = LKA_TW_CL;
  constexpr int r0 = K0 / 2, r2 = D * (KS / 2);
  constexpr int AH = LKA_TH + 2 * r2, AW = TW + 2 * r2, XW = AW + 2 * r0, XH = AH + 2 * r0;
  extern __shared__ float smem[];
  T* xs = reinterpret_cast<T*>(smem);  // CB planes of XH x XW
  float* as = smem + CB * XH * XW * (int)sizeof(T) / (int)sizeof(float);
  const int c0 = blockIdx.x * CB, n = blockIdx.z;
  const int H = g.H, W = g.W;
  const int h0 = (blockIdx.y / tiles_w) * LKA_TH, wb = (blockIdx.y % tiles_w) * TW;
  for (int i = threadIdx.x; i < XH * XW; i += 256) {
    const int gh = h0 - r2 - r0 + i / XW, gw = wb - r2 - r0 + i % XW;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (gh >= 0 && gh < H && gw >= 0 && gw < W)
      v = __ldg(reinterpret_cast<const uint4*>(x.data + x.off(n, c0, gh, gw)));
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int cb = 0; cb < CB; ++cb) xs[cb * XH * XW + i] = e[cb];
  }
  for (int cb = 0; cb < CB; ++cb) {
    const int c = c0 + cb;
    const LkaTile t{h0, wb, H, W, (int64_t)c * g.P + (int64_t)n * H * W};
    float w0r[K0 * K0];
#pragma unroll
    for (int q = 0; q < K0 * K0; ++q) w0r[q] = __ldg(w0 + (int64_t)c * K0 * K0 + q);
    __syncthreads();  // the x planes (first channel), the previous channel's stage 2 (others)
    lka_stage_a1<K0, LKA_OUT_PER_THREAD>(xs + cb * XH * XW, XW, as, AH, AW, r2, TW, w0r, b0[c], t, a1_out);
    float wsr[KS * KS];
#pragma unroll
    for (int q = 0; q < KS * KS; ++q) wsr[q] = __ldg(ws + (int64_t)c * KS * KS + q);
    __syncthreads();
    lka_stage_a2<KS, D, LKA_OUT_PER_THREAD>(as, AW, TW, wsr, bs[c], t, a2_out);
  }
}


// f(K0, KS, D) as integral constants: the specialised sizes, else (0, 0, 0) (the generic path).
template <class F>
void with_lka_sizes(int k0, int ks, int d, F&& f) {
  using std::integral_constant;
  if (d == 3 && k0 == 5 && ks == 7)
    f(integral_constant<int, 5>{}, integral_constant<int, 7>{}, integral_constant<int, 3>{});
  else if (d == 3 && k0 == 3 && ks == 7)
    f(integral_constant<int, 3>{}, integral_constant<int, 7>{}, integral_constant<int, 3>{});
  else if (d == 3 && k0 == 5 && ks == 5)
    f(integral_constant<int, 5>{}, integral_constant<int, 5>{}, integral_constant<int, 3>{});
  else
    f(integral_constant<int, 0>{}, integral_constant<int, 0>{}, integral_constant<int, 0>{});
}


inline bool lka_specialised(int k0, int ks, int d) {
  bool specialised = false;
  with_lka_sizes(k0, ks, d, [&](auto k0c, auto, auto) { specialised = decltype(k0c)::value > 0; });
  return specialised;
}

inline int64_t lka_stage_smem_bytes(int k0, int ks, int d) {
  return (int64_t)sizeof(float) * lka_stage_smem_floats(k0, ks, d, lka_tile_w(lka_specialised(k0, ks, d)));
}

template <class T, class S>
void launch_lka_stage(const LkaProblem& p, Act<T> x, const LkaParams& w, Geo g, T* a1_out, S* a2_out,
                      cudaStream_t stream) {
  with_lka_sizes(p.k0, p.ks, p.dilation, [&](auto k0c, auto ksc, auto dc) {
    constexpr int K0 = decltype(k0c)::value, KS = decltype(ksc)::value, D = decltype(dc)::value;
    if constexpr (K0 > 0) {
      constexpr int CB = lka_cl_channels<T>();
      constexpr int64_t smem = lka_stage_cl_smem_bytes<T, K0, KS, D>();
      static_assert(smem <= STATIC_SMEM_BYTES, "the channels_last stage fits without the opt-in");
      const int tiles_w = (int)cdiv(p.W, LKA_TW_CL);
      const int64_t tiles = cdiv(p.H, LKA_TH) * tiles_w;
      if (vector_loads(x) && p.C % CB == 0 && tiles <= MAX_GRID_YZ) {
        const dim3 grid((unsigned)(p.C / CB), (unsigned)tiles, (unsigned)p.N);
        lka_stage_cl_kernel<T, S, K0, KS, D><<<grid, 256, (size_t)smem, stream>>>(x, w.w0, w.b0, w.ws, w.bs, g, tiles_w,
                                                                                 a1_out, a2_out);
        return;
      }
    }
    const int tw = lka_tile_w(K0 > 0);
    const int tiles_w = (int)cdiv(p.W, tw);
    const dim3 grid((unsigned)p.C, (unsigned)(cdiv(p.H, LKA_TH) * tiles_w), (unsigned)p.N);
    const size_t smem = (size_t)lka_stage_smem_bytes(p.k0, p.ks, p.dilation);
    lka_stage_kernel<T, S, K0, KS, D><<<grid, 256, smem, stream>>>(x, w.w0, w.b0, w.ws, w.bs, p.k0, p.ks, p.dilation,
                                                                   g, tiles_w, a1_out, a2_out);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace dlkunet
