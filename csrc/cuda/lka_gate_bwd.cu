// lka_gate backward.  With u = w1 @ a2 + b1 and out = x * u, g = grad_out:
//   grad_x    = g * u  +  dw0^T(grad_a1)
//   du        = g * x;  grad_w1 = du a2^T;  grad_b1 = sum du;  grad_a2 = w1^T du
//   grad_a1   = dws_d^T(grad_a2) (inside the image only);  grad_ws, grad_bs from grad_a2 and a1
//   grad_w0, grad_b0 from grad_a1 and x.
// a1 and a2 are recomputed by the forward's stage kernel.  The GEMMs multiply as the forward does
// (common.cuh, Mma); a2, which only they read, is a plane of their operand type (PlaneOf), the other
// intermediates (a1, g * u, grad_a2, grad_a1) planes of the input's dtype: half the bytes for
// 16-bit inputs, rounded where eager's 16-bit backward rounds them (every op's output); the
// depthwise kernels that read them accumulate in float32.
#include "common.cuh"

namespace dlkunet {
namespace cuda {
namespace {

struct Layout {  // offsets into the float32 workspace
  int64_t a1, a2, gxd, ga2, ga1, wpart, spart, zpart, total;
};

Layout layout(const LkaProblem& p) {
  const int P = p.N * p.H * p.W;
  // Room, in floats, for a plane of the input's dtype, and for a2's (PlaneOf: float32 without MMAs).
  const int64_t plane = plane_floats(p.C, P, p.dtype);
  const int64_t a2_plane = (int64_t)p.C * P;
  int chunk = 0;
  const int S = wgrad_splits(p.C, p.C + 1, P, &chunk);
  Layout l;
  l.a1 = 0;
  l.a2 = l.a1 + plane;
  l.gxd = l.a2 + a2_plane;
  l.ga2 = l.gxd + plane;
  l.ga1 = l.ga2 + plane;
  l.wpart = l.ga1 + plane;
  l.spart = l.wpart + (int64_t)S * p.C * (p.C + 1);
  l.zpart = l.spart + dw_weight_workspace(p.C, P, p.ks);
  l.total = l.zpart + dw_weight_workspace(p.C, P, p.k0);
  return l;
}

}  // namespace

int64_t lka_backward_workspace(const LkaProblem& p) { return layout(p).total; }

cudaError_t lka_backward(const LkaProblem& p, View4 grad_out, View4 x, const LkaParams& w, View4 grad_x,
                         const LkaGrads& gr, float* ws, cudaStream_t stream) {
  const Geo g{p.N, p.H, p.W, p.N * p.H * p.W};
  const Layout l = layout(p);
  const Mma mode = mma_mode(p.dtype, p.tf32, p.tensor_cores);
  with_t(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Act<T> xa = act<T>(x), ga = act<T>(grad_out);
    T *a1 = reinterpret_cast<T*>(ws + l.a1), *gxd = reinterpret_cast<T*>(ws + l.gxd);
    T *ga2 = reinterpret_cast<T*>(ws + l.ga2), *ga1 = reinterpret_cast<T*>(ws + l.ga1);
    with_mma<T>(mode, [&](auto m) {
      constexpr Mma M = decltype(m)::value;
      using A2 = PlaneOf<M, T>;
      A2* a2 = reinterpret_cast<A2*>(ws + l.a2);
      launch_lka_stage<T>(p, xa, w, g, a1, a2, stream);
      // g * u, kept as a plane until the depthwise-transposed term is added.
      const EpiGate<T, OutPlane<T>> epi_gxd{ga, w.b1, p.C, OutPlane<T>{gxd, g.P}};
      launch_pix_gemm_as<M>(channel_major(a2, g.P, p.C), w.w1, p.C, 1, p.C, p.C, g, epi_gxd, stream);
      // grad_a2[ci][p] = sum_co w1[co][ci] * du[co][p]: w1 read transposed (row ci, k co).
      const LoadProd<T> du{ga, xa};
      launch_pix_gemm_as<M>(du, w.w1, 1, p.C, p.C, p.C, g, EpiStorePlane<T>{ga2, g.P, p.C}, stream);
      // grad_w1 and, through a column of ones appended to a2, grad_b1.
      launch_wgrad_as<M>(du, channel_major(a2, g.P, p.C), p.C, p.C + 1, p.C, g, ws + l.wpart, stream);
    });
    int chunk = 0;
    const int S = wgrad_splits(p.C, p.C + 1, g.P, &chunk);
    launch_reduce_splits(ws + l.wpart, S, (int64_t)p.C * (p.C + 1), p.C + 1, p.C, gr.w1, gr.b1, stream);
    with_k(p.ks, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      launch_dw_bwd_input<K>(ga2, w.ws, p.ks, p.dilation, g, p.C, static_cast<const T*>(nullptr),
                             OutPlane<T>{ga1, g.P}, stream);
      launch_dw_bwd_weight<K>(ga2, SrcPlane<T>{a1, g.P, p.H, p.W}, p.ks, p.dilation, g, p.C, ws + l.spart, gr.ws,
                              gr.bs, stream);
    });
    with_k(p.k0, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      launch_dw_bwd_input<K>(ga1, w.w0, p.k0, 1, g, p.C, gxd, OutAct<T>{act<T>(grad_x)}, stream);
      launch_dw_bwd_weight<K>(ga1, SrcAct<T>{xa}, p.k0, 1, g, p.C, ws + l.zpart, gr.w0, gr.b0, stream);
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dlkunet
