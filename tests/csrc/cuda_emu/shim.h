// Host emulation of the few CUDA features csrc/cuda uses, so the kernels' index math, bounds,
// barriers and reductions run (slowly) on a CPU: blocks one at a time, each CUDA thread a ucontext
// fiber, __syncthreads a yield to a scheduler that resumes all fibers once every one has arrived,
// warp shuffles through a shared buffer between two barriers.  __shared__ becomes `static` (one
// block at a time).  Kernel launches (<<<...>>>) and dynamic shared memory are rewritten to calls
// of dlk_launch / dlk_dyn_smem by tests/csrc/test_cuda_emulated.py before compiling.
// WMMA (nvcuda::wmma) is emulated with every thread holding its warp's whole fragment: loads,
// products and stores are done redundantly by each lane, with the same results a warp computes
// (operands as stored, float32 accumulation; the order of the accumulation may differ).
// Not emulated: warp-level timing, races between threads (fibers run in a fixed order), and the
// precision of fast-math intrinsics.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <ucontext.h>
#include <vector>
#include <algorithm>
#include <functional>
#include <type_traits>
#include <cstdint>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct DlkCtx { uint3 tid, bid; dim3 bdim, gdim; };
// Every CUDA thread of a block is a ucontext fiber on one OS thread; a barrier yields back to the
// scheduler, which resumes the fibers in turn once all of them have arrived.
struct DlkFiber { ucontext_t ctx; std::vector<char> stack; DlkCtx c; bool done; };
inline DlkCtx dlk_ctx;
inline ucontext_t dlk_sched;
inline std::vector<DlkFiber>* dlk_fibers = nullptr;
inline int dlk_cur = 0;
inline std::vector<char> dlk_dyn;
inline float dlk_slots[1024];
inline int dlk_nthreads = 0;
inline std::function<void()>* dlk_body = nullptr;
inline void* dlk_dyn_smem() { return dlk_dyn.data(); }

#define threadIdx (dlk_ctx.tid)
#define blockIdx (dlk_ctx.bid)
#define blockDim (dlk_ctx.bdim)
#define gridDim (dlk_ctx.gdim)

inline void __syncthreads() {
  DlkFiber& f = (*dlk_fibers)[dlk_cur];
  f.c = dlk_ctx;
  swapcontext(&f.ctx, &dlk_sched);
  dlk_ctx = f.c;
}
template <class T> inline T dlk_ldg(const T* p) { return *p; }
#define __ldg dlk_ldg
inline float dlk_shfl_xor(unsigned, float v, int o) {
  const int t = dlk_ctx.tid.x;
  dlk_slots[t] = v;
  __syncthreads();
  const int src = t ^ o;
  if (src >= dlk_nthreads) { fprintf(stderr, "shfl out of block\n"); abort(); }
  float r = dlk_slots[src];
  __syncthreads();
  return r;
}
#define __shfl_xor_sync dlk_shfl_xor
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision { struct tf32 {}; }
template <class T> struct dlk_elem { using type = T; };
template <> struct dlk_elem<precision::tf32> { using type = float; };
template <class Use, int M, int N, int K> struct dlk_dims;
template <int M, int N, int K> struct dlk_dims<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct dlk_dims<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct dlk_dims<accumulator, M, N, K> { static constexpr int R = M, C = N; };
// The whole R x C tile, row-major, in every thread.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  using element_type = typename dlk_elem<T>::type;
  static constexpr int R = dlk_dims<Use, M, N, K>::R, C = dlk_dims<Use, M, N, K>::C;
  static constexpr int num_elements = R * C;
  element_type x[R * C];
};
inline float dlk_f(float v) { return v; }
inline float dlk_f(__half v) { return __half2float(v); }
inline float dlk_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class Frag, class V> inline void fill_fragment(Frag& f, V v) {
  for (int i = 0; i < Frag::num_elements; ++i) f.x[i] = v;
}
template <class Use, int M, int N, int K, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int r = 0; r < F::R; ++r)
    for (int c = 0; c < F::C; ++c) f.x[r * F::C + c] = col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t lay) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) p[lay == mem_col_major ? (size_t)c * ldm + r : (size_t)r * ldm + c] = f.x[r * N + c];
}
template <int M, int N, int K, class TA, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += dlk_f(a.x[i * K + k]) * dlk_f(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
// cvt.rna.tf32.f32: round to nearest, ties away from zero, at 10 mantissa bits.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace wmma
}  // namespace nvcuda

using std::min;
using std::max;
inline cudaError_t dlk_last_error() { return cudaSuccess; }
#define cudaGetLastError() dlk_last_error()
#define cudaMemsetAsync(p, v, n, s) (std::memset((p), (v), (n)), cudaSuccess)

inline void dlk_entry() {
  DlkFiber& f = (*dlk_fibers)[dlk_cur];
  dlk_ctx = f.c;
  (*dlk_body)();
  f.done = true;
  swapcontext(&f.ctx, &dlk_sched);
}

template <class F>
void dlk_launch(dim3 g, dim3 b, size_t smem, cudaStream_t, F&& fn) {
  const int nt = b.x * b.y * b.z;
  if (b.y != 1 || b.z != 1 || nt > 1024) { fprintf(stderr, "unsupported block\n"); abort(); }
  if (g.y > 65535 || g.z > 65535) { fprintf(stderr, "grid y/z too large\n"); abort(); }
  std::function<void()> body = fn;
  dlk_body = &body;
  static std::vector<DlkFiber> fibers(1024);
  dlk_fibers = &fibers;
  dlk_nthreads = nt;
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        dlk_dyn.assign(smem + 16, (char)0x7f);  // poison: unwritten shared memory reads as ~3e38
        for (int t = 0; t < nt; ++t) {
          DlkFiber& f = fibers[t];
          f.stack.resize(1 << 16);
          f.done = false;
          f.c.tid = make_uint3(t, 0, 0);
          f.c.bid = make_uint3(bx, by, bz);
          f.c.bdim = b;
          f.c.gdim = g;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, dlk_entry, 0);
        }
        // Run every fiber to its next barrier (or its end); all must agree on which.
        for (;;) {
          int finished = 0;
          for (int t = 0; t < nt; ++t) {
            if (fibers[t].done) { ++finished; continue; }
            dlk_cur = t;
            swapcontext(&dlk_sched, &fibers[t].ctx);
            if (fibers[t].done) ++finished;
          }
          if (finished == nt) break;
          if (finished != 0) {
            // A thread left while others wait at a barrier: undefined behaviour on a GPU.
            bool any_waiting = false;
            for (int t = 0; t < nt; ++t) any_waiting |= !fibers[t].done;
            if (any_waiting) { fprintf(stderr, "barrier not reached by all threads\n"); abort(); }
          }
        }
      }
}
