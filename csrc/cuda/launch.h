// Launchers of the CUDA kernels: plain C++ (raw pointers, sizes, strides, a stream), no ATen, so
// the .cu files compile with nvcc alone and the ATen glue (dwconv_bn_act.cpp, lka_gate.cpp) stays
// free of device code.
//
// Conventions shared by every launcher:
// - Activations (x, y, grad_y, grad_x, out) are 4-D tensors in the launcher's dtype with arbitrary
//   element strides (NCHW, channels_last or anything else without overlap).
// - Parameters (weights, biases, gamma, beta, statistics) are float32 and contiguous; parameter
//   gradients come back float32 and contiguous (the glue casts them to the parameter's dtype).
// - `workspace` is float32 scratch of at least the matching *_workspace() elements.
// - A launcher returns the cudaError_t of its last launch (cudaSuccess when all went well).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace dlkunet {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct View4 {  // an activation tensor: data pointer and element strides of (N, C, H, W)
  void* data;
  int64_t sn, sc, sh, sw;
};

// How the pointwise GEMMs multiply (common.cuh, Mma): on tensor cores when `tensor_cores` (the GPU
// has compute capability >= 8.0), in the input dtype for 16-bit inputs and in TF32 for float32
// when `tf32` (torch.backends.cudnn.allow_tf32, the flag eager convolutions follow); otherwise
// in exact float32 on CUDA cores.
constexpr int kMmaMinComputeMajor = 8;  // TF32 and bfloat16 MMAs: compute capability 8.0

struct DwConvProblem {
  int N, Cin, Cout, H, W;
  int k;  // depthwise kernel size (odd); 3, 5, 7 are specialised, others take a generic path
  DType dtype;
  bool tf32 = false;
  bool tensor_cores = false;
};

struct DwConvParams {  // all float32, contiguous
  const float* w_dw;   // (Cin, k*k)
  const float* b_dw;   // (Cin)
  const float* w_pw;   // (Cout, Cin)
  const float* b_pw;   // (Cout)
  const float* gamma;  // (Cout)
  const float* beta;   // (Cout)
};

int64_t dwconv_forward_workspace(const DwConvProblem& p, bool training);
// training: writes the batch statistics to mean_out/var_out and normalises with them;
// eval: normalises with mean_in/var_in and copies them to mean_out/var_out.
cudaError_t dwconv_forward(const DwConvProblem& p, View4 x, const DwConvParams& w,
                           const float* mean_in, const float* var_in, bool training, float eps,
                           bool relu, View4 y, float* mean_out, float* var_out, float* workspace,
                           cudaStream_t stream);

struct DwConvGrads {  // all float32, contiguous, written entirely
  float* w_dw;   // (Cin, k*k)
  float* b_dw;   // (Cin)
  float* w_pw;   // (Cout, Cin)
  float* b_pw;   // (Cout)
  float* gamma;  // (Cout)
  float* beta;   // (Cout)
};

int64_t dwconv_backward_workspace(const DwConvProblem& p);
cudaError_t dwconv_backward(const DwConvProblem& p, View4 grad_y, View4 x, const DwConvParams& w,
                            const float* mean, const float* var, bool training, float eps,
                            bool relu, View4 grad_x, const DwConvGrads& g, float* workspace,
                            cudaStream_t stream);

struct LkaProblem {
  int N, C, H, W;
  int k0, ks, dilation;  // (5,7,3), (3,7,3), (5,5,3) are specialised, others take a generic path
  DType dtype;
  bool tf32 = false;  // as in DwConvProblem
  bool tensor_cores = false;
};

struct LkaParams {  // all float32, contiguous
  const float* w0;  // (C, k0*k0)
  const float* b0;  // (C)
  const float* ws;  // (C, ks*ks)
  const float* bs;  // (C)
  const float* w1;  // (C, C)
  const float* b1;  // (C)
};

// Dynamic shared memory the depthwise-stage kernel needs for this problem (the glue checks it
// against the device limit before launching).
int64_t lka_shared_bytes(const LkaProblem& p);

int64_t lka_forward_workspace(const LkaProblem& p);
cudaError_t lka_forward(const LkaProblem& p, View4 x, const LkaParams& w, View4 out,
                        float* workspace, cudaStream_t stream);

struct LkaGrads {  // all float32, contiguous, written entirely
  float* w0;  // (C, k0*k0)
  float* b0;  // (C)
  float* ws;  // (C, ks*ks)
  float* bs;  // (C)
  float* w1;  // (C, C)
  float* b1;  // (C)
};

int64_t lka_backward_workspace(const LkaProblem& p);
cudaError_t lka_backward(const LkaProblem& p, View4 grad_out, View4 x, const LkaParams& w,
                         View4 grad_x, const LkaGrads& g, float* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace dlkunet
