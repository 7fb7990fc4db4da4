// lka_gate forward: out = x * (w1 @ dw_d(dw(x, w0, b0), ws, bs) + b1).
// Pass 1 (lka_stage_kernel): both depthwise stages per (n, c, spatial tile) from one shared-memory
// tile of x with the combined halo; a2 goes to a plane of the GEMM's operand type (PlaneOf: 16-bit
// under 16-bit MMAs, else float32).  Pass 2 (pix_gemm, tensor cores or fp32 by common.cuh's Mma):
// the pointwise mix of a2 with the bias and the gate multiply by x in the epilogue.
#include "common.cuh"

namespace dlkunet {
namespace cuda {

int64_t lka_shared_bytes(const LkaProblem& p) {
  return lka_stage_smem_bytes(p.k0, p.ks, p.dilation);
}

int64_t lka_forward_workspace(const LkaProblem& p) { return (int64_t)p.C * p.N * p.H * p.W; }

cudaError_t lka_forward(const LkaProblem& p, View4 x, const LkaParams& w, View4 out, float* workspace,
                        cudaStream_t stream) {
  const Geo g{p.N, p.H, p.W, p.N * p.H * p.W};
  with_t(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Act<T> xa = act<T>(x);
    with_mma<T>(mma_mode(p.dtype, p.tf32, p.tensor_cores), [&](auto m) {
      constexpr Mma M = decltype(m)::value;
      using S = PlaneOf<M, T>;
      S* a2 = reinterpret_cast<S*>(workspace);
      launch_lka_stage<T>(p, xa, w, g, nullptr, a2, stream);
      const EpiGate<T, OutAct<T>> epi{xa, w.b1, p.C, OutAct<T>{act<T>(out)}};
      launch_pix_gemm_as<M>(channel_major(a2, g.P, p.C), w.w1, p.C, 1, p.C, p.C, g, epi, stream);
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dlkunet
