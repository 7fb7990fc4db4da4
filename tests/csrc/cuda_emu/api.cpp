// C ABI over the launchers of csrc/cuda/launch.h, for ctypes (test_cuda_emulated.py).
// tf32 and tc set the problems' precision fields (launch.h): TF32 allowed, tensor cores present.
#include "launch.h"
using namespace dlkunet::cuda;
static View4 v4(void* d, const int64_t* s) { return View4{d, s[0], s[1], s[2], s[3]}; }
static DwConvProblem dw(int N, int Cin, int Cout, int H, int W, int k, int dt, int tf32, int tc) {
  return DwConvProblem{N, Cin, Cout, H, W, k, (DType)dt, tf32 != 0, tc != 0};
}
static LkaProblem lka(int N, int C, int H, int W, int k0, int ks, int d, int dt, int tf32, int tc) {
  return LkaProblem{N, C, H, W, k0, ks, d, (DType)dt, tf32 != 0, tc != 0};
}
extern "C" {
long long emu_dwconv_fwd_ws(int N, int Cin, int Cout, int H, int W, int k, int dt, int tf32, int tc, int training) {
  return dwconv_forward_workspace(dw(N, Cin, Cout, H, W, k, dt, tf32, tc), training);
}
long long emu_dwconv_bwd_ws(int N, int Cin, int Cout, int H, int W, int k, int dt, int tf32, int tc) {
  return dwconv_backward_workspace(dw(N, Cin, Cout, H, W, k, dt, tf32, tc));
}
int emu_dwconv_fwd(int N, int Cin, int Cout, int H, int W, int k, int dt, int tf32, int tc, void* x,
                   const int64_t* xs, const float** prm, const float* mean_in, const float* var_in, int training,
                   float eps, int relu, void* y, const int64_t* ys, float* mean_out, float* var_out, float* ws) {
  DwConvParams w{prm[0], prm[1], prm[2], prm[3], prm[4], prm[5]};
  return (int)dwconv_forward(dw(N, Cin, Cout, H, W, k, dt, tf32, tc), v4(x, xs), w, mean_in, var_in, training, eps,
                             relu, v4(y, ys), mean_out, var_out, ws, nullptr);
}
int emu_dwconv_bwd(int N, int Cin, int Cout, int H, int W, int k, int dt, int tf32, int tc, void* gy,
                   const int64_t* gys, void* x, const int64_t* xs, const float** prm, const float* mean,
                   const float* var, int training, float eps, int relu, void* gx, const int64_t* gxs, float** grads,
                   float* ws) {
  DwConvParams w{prm[0], prm[1], prm[2], prm[3], prm[4], prm[5]};
  DwConvGrads g{grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
  return (int)dwconv_backward(dw(N, Cin, Cout, H, W, k, dt, tf32, tc), v4(gy, gys), v4(x, xs), w, mean, var,
                              training, eps, relu, v4(gx, gxs), g, ws, nullptr);
}
long long emu_lka_fwd_ws(int N, int C, int H, int W, int k0, int ks, int d, int dt, int tf32, int tc) {
  return lka_forward_workspace(lka(N, C, H, W, k0, ks, d, dt, tf32, tc));
}
long long emu_lka_bwd_ws(int N, int C, int H, int W, int k0, int ks, int d, int dt, int tf32, int tc) {
  return lka_backward_workspace(lka(N, C, H, W, k0, ks, d, dt, tf32, tc));
}
int emu_lka_fwd(int N, int C, int H, int W, int k0, int ks, int d, int dt, int tf32, int tc, void* x,
                const int64_t* xs, const float** prm, void* out, const int64_t* os, float* ws) {
  LkaParams w{prm[0], prm[1], prm[2], prm[3], prm[4], prm[5]};
  return (int)lka_forward(lka(N, C, H, W, k0, ks, d, dt, tf32, tc), v4(x, xs), w, v4(out, os), ws, nullptr);
}
int emu_lka_bwd(int N, int C, int H, int W, int k0, int ks, int d, int dt, int tf32, int tc, void* go,
                const int64_t* gos, void* x, const int64_t* xs, const float** prm, void* gx, const int64_t* gxs,
                float** grads, float* ws) {
  LkaParams w{prm[0], prm[1], prm[2], prm[3], prm[4], prm[5]};
  LkaGrads g{grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
  return (int)lka_backward(lka(N, C, H, W, k0, ks, d, dt, tf32, tc), v4(go, gos), v4(x, xs), w, v4(gx, gxs), g,
                           ws, nullptr);
}
}
