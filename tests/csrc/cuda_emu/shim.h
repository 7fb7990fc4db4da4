// Host emulation of the few CUDA features csrc/cuda uses, so the kernels' index math, bounds,
// barriers and reductions run (slowly) on a CPU: blocks one at a time, each CUDA thread a ucontext
// fiber, __syncthreads a yield to a scheduler that resumes all fibers once every one has arrived,
// warp shuffles through a shared buffer between two barriers.  __shared__ becomes `static` (one
// block at a time).  Kernel launches (<<<...>>>) and dynamic shared memory are rewritten to calls
// of dlk_launch / dlk_dyn_smem by tests/csrc/test_cuda_emulated.py before compiling.
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
