// Shared ATen-side helpers of the CUDA glue (dwconv_bn_act.cpp, lka_gate.cpp, bind.cpp): the
// memory-safety checks, dtype mapping, memory formats, and the launcher views.
//
// Bad inputs get their user-facing messages in Python (dlkunet/ops/validation.py), before any
// kernel runs.  What stays here guards memory and launches for a direct caller of the extension:
// devices, shapes and dtypes the launchers index by, and the kernels' index and grid limits.
#pragma once
#include <ATen/Context.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <climits>
#include <tuple>
#include <vector>

#include "launch.h"

// The one check macro of the C++ side (csrc/cpu/common.h defines the same one).
#ifndef DLK_CHECK
#define DLK_CHECK(cond, ...) \
  TORCH_CHECK(cond, "dlkunet: internal check (" #cond ") failed in ", __VA_ARGS__, \
              "; dlkunet.ops validates inputs before calling the extension")
#endif

namespace dlkunet {
namespace cuda_glue {

using at::Tensor;

template <class S> cuda::DType dtype_of();
template <> inline cuda::DType dtype_of<float>() { return cuda::DType::F32; }
template <> inline cuda::DType dtype_of<at::Half>() { return cuda::DType::F16; }
template <> inline cuda::DType dtype_of<at::BFloat16>() { return cuda::DType::BF16; }

// x: a non-empty 4-D CUDA tensor of a supported dtype within the kernels' index limits; returns
// the launcher's dtype.
inline cuda::DType check_x(const Tensor& x, const char* op) {
  DLK_CHECK(x.is_cuda(), op);
  DLK_CHECK(x.dim() == 4 && x.numel() > 0, op);
  const auto st = x.scalar_type();
  DLK_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op);
  DLK_CHECK(x.size(0) <= 65535, op);
  DLK_CHECK(x.size(0) * x.size(2) * x.size(3) <= INT_MAX - 1024, op);
  cuda::DType dt = cuda::DType::F32;
  AT_DISPATCH_SWITCH(st, "dlkunet cuda backend",
                     AT_DISPATCH_CASE(at::kFloat, [&] { dt = dtype_of<scalar_t>(); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { dt = dtype_of<scalar_t>(); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { dt = dtype_of<scalar_t>(); }));
  return dt;
}

// An activation with x's device, dtype and the given shape (grad_y, grad_out).
inline void check_act(const Tensor& t, const char* op, const char* name, const Tensor& x, at::IntArrayRef shape) {
  DLK_CHECK(t.device() == x.device() && t.sizes() == shape && t.scalar_type() == x.scalar_type(), op, " (", name, ")");
}

// A parameter: checked, then as a contiguous float32 copy (or the tensor itself when it already is one).
inline Tensor param(const Tensor& t, const char* op, const char* name, const Tensor& x, at::IntArrayRef shape,
                    bool float32_ok) {
  DLK_CHECK(t.device() == x.device() && t.sizes() == shape, op, " (", name, ")");
  DLK_CHECK(t.scalar_type() == x.scalar_type() || (float32_ok && t.scalar_type() == at::kFloat), op, " (", name, ")");
  return t.to(at::kFloat).contiguous();
}

// A depthwise weight (C, 1, k, k) with k odd; returns k.
inline int64_t check_depthwise(const Tensor& w, const char* op, const char* name, int64_t C) {
  DLK_CHECK(w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1, op,
            " (", name, ")");
  return w.size(2);
}

// channels_last when t's strides are ordered so (ATen's stride-based rule, as dlkunet/ops/layout.py).
inline at::MemoryFormat format_of(const Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

// The kernels take any strides; overlapping or otherwise odd layouts are made dense first, keeping
// the layout their strides suggest (which decides the outputs' layout).
inline Tensor dense(const Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous(format_of(t));
}

// How the problem's GEMMs multiply (launch.h): TF32 follows the flag eager convolutions follow
// (torch.backends.cudnn.allow_tf32), read on every call; tensor cores where x's GPU has the MMAs.
template <class Problem>
void set_precision(Problem& p, const Tensor& x) {
  int major = 0;
  DLK_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()) == cudaSuccess,
            "set_precision");
  p.tf32 = at::globalContext().allowTF32CuDNN();
  p.tensor_cores = major >= cuda::kMmaMinComputeMajor;
}

inline cuda::View4 view4(const Tensor& t) {
  return cuda::View4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline Tensor workspace(const Tensor& x, int64_t floats) {
  return at::empty({floats > 0 ? floats : 1}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
}

inline void check_launch(cudaError_t err, const char* op) {
  DLK_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                                         const Tensor& w_pw, const Tensor& b_pw, const Tensor& gamma,
                                                         const Tensor& beta, const Tensor& running_mean,
                                                         const Tensor& running_var, bool training, double eps,
                                                         bool relu);
std::vector<Tensor> dwconv_bn_act_backward(const Tensor& grad_y, const Tensor& x, const Tensor& w_dw,
                                           const Tensor& b_dw, const Tensor& w_pw, const Tensor& b_pw,
                                           const Tensor& gamma, const Tensor& beta, const Tensor& mean,
                                           const Tensor& var, bool training, double eps, bool relu);
Tensor lka_gate_forward(const Tensor& x, const Tensor& w0, const Tensor& b0, const Tensor& ws, const Tensor& bs,
                        const Tensor& w1, const Tensor& b1, int64_t dilation);
std::vector<Tensor> lka_gate_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w0, const Tensor& b0,
                                      const Tensor& ws, const Tensor& bs, const Tensor& w1, const Tensor& b1,
                                      int64_t dilation);

}  // namespace cuda_glue
}  // namespace dlkunet
