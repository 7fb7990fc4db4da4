// Shared ATen-side helpers of the CUDA glue (dwconv_bn_act.cpp, lka_gate.cpp, bind.cpp): input
// checks with clear messages, dtype mapping, memory formats, and the launcher views.
#pragma once
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <climits>
#include <tuple>
#include <vector>

#include "launch.h"

namespace dlkunet {
namespace cuda_glue {

using at::Tensor;

template <class S> cuda::DType dtype_of();
template <> inline cuda::DType dtype_of<float>() { return cuda::DType::F32; }
template <> inline cuda::DType dtype_of<at::Half>() { return cuda::DType::F16; }
template <> inline cuda::DType dtype_of<at::BFloat16>() { return cuda::DType::BF16; }

// x: a non-empty 4-D CUDA tensor of a supported dtype; returns the launcher's dtype.
inline cuda::DType check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.numel() > 0, op, ": x is empty (shape ", x.sizes(), "); N, C, H and W must all be >= 1");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": the cuda backend supports float32, float16 and bfloat16, got ", st,
              " (use the torch backend for other dtypes)");
  TORCH_CHECK(x.size(0) <= 65535, op, ": batch size ", x.size(0), " exceeds the kernels' limit of 65535");
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) <= INT_MAX - 1024, op, ": N*H*W = ",
              x.size(0) * x.size(2) * x.size(3), " is too large for 32-bit pixel indices");
  cuda::DType dt = cuda::DType::F32;
  AT_DISPATCH_SWITCH(st, "dlkunet cuda backend",
                     AT_DISPATCH_CASE(at::kFloat, [&] { dt = dtype_of<scalar_t>(); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { dt = dtype_of<scalar_t>(); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { dt = dtype_of<scalar_t>(); }));
  return dt;
}

// An activation with x's device, dtype and the given shape (grad_y, grad_out).
inline void check_act(const Tensor& t, const char* op, const char* name, const Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
}

// A parameter: checked, then as a contiguous float32 copy (or the tensor itself when it already is one).
inline Tensor param(const Tensor& t, const char* op, const char* name, const Tensor& x, at::IntArrayRef shape,
                    bool float32_ok) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (float32_ok && t.scalar_type() == at::kFloat), op, ": ", name,
              " has dtype ", t.scalar_type(), " but must be ", x.scalar_type(), float32_ok ? " or float32" : "");
  return t.to(at::kFloat).contiguous();
}

// A depthwise weight (C, 1, k, k) with k odd; returns k.
inline int64_t check_depthwise(const Tensor& w, const char* op, const char* name, int64_t C) {
  TORCH_CHECK(w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) == w.size(3), op, ": ", name,
              " must be a depthwise weight of shape (", C, ", 1, k, k), got ", w.sizes());
  TORCH_CHECK(w.size(2) % 2 == 1, op, ": ", name, " has an even kernel size ", w.size(2),
              "; only odd sizes keep H x W");
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

inline cuda::View4 view4(const Tensor& t) {
  return cuda::View4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline Tensor workspace(const Tensor& x, int64_t floats) {
  return at::empty({floats > 0 ? floats : 1}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
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
