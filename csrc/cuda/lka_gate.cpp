// ATen glue of the CUDA lka_gate kernels: input checks, dtype, output allocation in x's memory
// format, the current stream; the kernels themselves live in lka_gate_{fwd,bwd}.cu.
#include "glue.h"

namespace dlkunet {
namespace cuda_glue {
namespace {

struct Checked {
  Tensor x;
  cuda::LkaProblem p;
  Tensor w0, b0, ws, bs, w1, b1;  // float32, contiguous
};

Checked check_inputs(const char* op, const Tensor& x_in, const Tensor& w0, const Tensor& b0, const Tensor& ws,
                     const Tensor& bs, const Tensor& w1, const Tensor& b1, int64_t dilation) {
  Checked c;
  c.p.dtype = check_x(x_in, op);
  c.x = dense(x_in);
  const int64_t N = c.x.size(0), C = c.x.size(1), H = c.x.size(2), W = c.x.size(3);
  const int64_t k0 = check_depthwise(w0, op, "w0", C);
  const int64_t ks = check_depthwise(ws, op, "ws", C);
  DLK_CHECK(dilation >= 1 && dilation <= 64, op);
  c.p = cuda::LkaProblem{(int)N, (int)C, (int)H, (int)W, (int)k0, (int)ks, (int)dilation, c.p.dtype};
  set_precision(c.p, c.x);
  const int64_t smem = cuda::lka_shared_bytes(c.p);
  DLK_CHECK(smem <= 48 * 1024, op);  // dlkunet/ops/validation.py cuda_lka_shared_bytes mirrors lka_shared_bytes
  c.w0 = param(w0, op, "w0", c.x, {C, 1, k0, k0}, false);
  c.b0 = param(b0, op, "b0", c.x, {C}, false);
  c.ws = param(ws, op, "ws", c.x, {C, 1, ks, ks}, false);
  c.bs = param(bs, op, "bs", c.x, {C}, false);
  c.w1 = param(w1, op, "w1", c.x, {C, C, 1, 1}, false);
  c.b1 = param(b1, op, "b1", c.x, {C}, false);
  return c;
}

cuda::LkaParams params_of(const Checked& c) {
  return cuda::LkaParams{c.w0.data_ptr<float>(), c.b0.data_ptr<float>(), c.ws.data_ptr<float>(),
                         c.bs.data_ptr<float>(), c.w1.data_ptr<float>(), c.b1.data_ptr<float>()};
}

}  // namespace

Tensor lka_gate_forward(const Tensor& x_in, const Tensor& w0, const Tensor& b0, const Tensor& ws, const Tensor& bs,
                        const Tensor& w1, const Tensor& b1, int64_t dilation) {
  const char* op = "cuda_lka_gate_forward";
  const Checked c = check_inputs(op, x_in, w0, b0, ws, bs, w1, b1, dilation);
  const c10::cuda::CUDAGuard guard(c.x.device());
  Tensor out = at::empty(c.x.sizes(), c.x.options().memory_format(format_of(c.x)));
  Tensor work = workspace(c.x, cuda::lka_forward_workspace(c.p));
  const cudaError_t err = cuda::lka_forward(c.p, view4(c.x), params_of(c), view4(out), work.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, op);
  return out;
}

std::vector<Tensor> lka_gate_backward(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& w0,
                                      const Tensor& b0, const Tensor& ws, const Tensor& bs, const Tensor& w1,
                                      const Tensor& b1, int64_t dilation) {
  const char* op = "cuda_lka_gate_backward";
  const Checked c = check_inputs(op, x_in, w0, b0, ws, bs, w1, b1, dilation);
  const c10::cuda::CUDAGuard guard(c.x.device());
  check_act(grad_out_in, op, "grad_out", c.x, c.x.sizes());
  const Tensor grad_out = dense(grad_out_in);
  const int64_t C = c.p.C, k0 = c.p.k0, ks = c.p.ks;
  Tensor grad_x = at::empty(c.x.sizes(), c.x.options().memory_format(format_of(c.x)));
  const auto f32 = c.x.options().dtype(at::kFloat);
  Tensor g_w0 = at::empty({C, k0 * k0}, f32), g_b0 = at::empty({C}, f32);
  Tensor g_ws = at::empty({C, ks * ks}, f32), g_bs = at::empty({C}, f32);
  Tensor g_w1 = at::empty({C, C}, f32), g_b1 = at::empty({C}, f32);
  const cuda::LkaGrads grads{g_w0.data_ptr<float>(), g_b0.data_ptr<float>(), g_ws.data_ptr<float>(),
                             g_bs.data_ptr<float>(), g_w1.data_ptr<float>(), g_b1.data_ptr<float>()};
  Tensor work = workspace(c.x, cuda::lka_backward_workspace(c.p));
  const cudaError_t err = cuda::lka_backward(c.p, view4(grad_out), view4(c.x), params_of(c), view4(grad_x), grads,
                                             work.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, op);
  return {grad_x,
          g_w0.view({C, 1, k0, k0}).to(w0.scalar_type()),
          g_b0.to(b0.scalar_type()),
          g_ws.view({C, 1, ks, ks}).to(ws.scalar_type()),
          g_bs.to(bs.scalar_type()),
          g_w1.view({C, C, 1, 1}).to(w1.scalar_type()),
          g_b1.to(b1.scalar_type())};
}

}  // namespace cuda_glue
}  // namespace dlkunet
