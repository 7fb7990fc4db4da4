// ATen glue of the CUDA dwconv_bn_act kernels: input checks, dtype, output allocation in x's
// memory format, the current stream; the kernels themselves live in dwconv_bn_act_{fwd,bwd}.cu.
#include "glue.h"

namespace dlkunet {
namespace cuda_glue {
namespace {

struct Checked {
  Tensor x;
  cuda::DwConvProblem p;
  Tensor w_dw, b_dw, w_pw, b_pw, gamma, beta;  // float32, contiguous
};

Checked check_inputs(const char* op, const Tensor& x_in, const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pw,
                     const Tensor& b_pw, const Tensor& gamma, const Tensor& beta) {
  Checked c;
  c.p.dtype = check_x(x_in, op);
  c.x = dense(x_in);
  const int64_t N = c.x.size(0), Cin = c.x.size(1), H = c.x.size(2), W = c.x.size(3);
  const int64_t k = check_depthwise(w_dw, op, "w_dw", Cin);
  DLK_CHECK(w_pw.dim() == 4 && w_pw.size(1) == Cin && w_pw.size(2) == 1 && w_pw.size(3) == 1 && w_pw.size(0) >= 1,
            op, " (w_pw)");
  const int64_t Cout = w_pw.size(0);
  c.p.N = (int)N;
  c.p.Cin = (int)Cin;
  c.p.Cout = (int)Cout;
  c.p.H = (int)H;
  c.p.W = (int)W;
  c.p.k = (int)k;
  set_precision(c.p, c.x);
  c.w_dw = param(w_dw, op, "w_dw", c.x, {Cin, 1, k, k}, false);
  c.b_dw = param(b_dw, op, "b_dw", c.x, {Cin}, false);
  c.w_pw = param(w_pw, op, "w_pw", c.x, {Cout, Cin, 1, 1}, false);
  c.b_pw = param(b_pw, op, "b_pw", c.x, {Cout}, false);
  c.gamma = param(gamma, op, "gamma", c.x, {Cout}, true);
  c.beta = param(beta, op, "beta", c.x, {Cout}, true);
  return c;
}

cuda::DwConvParams params_of(const Checked& c) {
  return cuda::DwConvParams{c.w_dw.data_ptr<float>(), c.b_dw.data_ptr<float>(), c.w_pw.data_ptr<float>(),
                            c.b_pw.data_ptr<float>(), c.gamma.data_ptr<float>(), c.beta.data_ptr<float>()};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(const Tensor& x_in, const Tensor& w_dw, const Tensor& b_dw,
                                                         const Tensor& w_pw, const Tensor& b_pw, const Tensor& gamma,
                                                         const Tensor& beta, const Tensor& running_mean,
                                                         const Tensor& running_var, bool training, double eps,
                                                         bool relu) {
  const char* op = "cuda_dwconv_bn_act_forward";
  const Checked c = check_inputs(op, x_in, w_dw, b_dw, w_pw, b_pw, gamma, beta);
  const c10::cuda::CUDAGuard guard(c.x.device());
  const int64_t Cout = c.p.Cout;
  const Tensor rm = param(running_mean, op, "running_mean", c.x, {Cout}, true);
  const Tensor rv = param(running_var, op, "running_var", c.x, {Cout}, true);
  Tensor y = at::empty({c.p.N, Cout, c.p.H, c.p.W}, c.x.options().memory_format(format_of(c.x)));
  // Eval: the kernel copies the running statistics here (outputs never alias inputs).
  Tensor mean = at::empty({Cout}, c.x.options().dtype(at::kFloat));
  Tensor var = at::empty({Cout}, c.x.options().dtype(at::kFloat));
  Tensor ws = workspace(c.x, cuda::dwconv_forward_workspace(c.p, training));
  const cudaError_t err = cuda::dwconv_forward(
      c.p, view4(c.x), params_of(c), rm.data_ptr<float>(), rv.data_ptr<float>(), training, (float)eps, relu,
      view4(y), mean.data_ptr<float>(), var.data_ptr<float>(), ws.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, op);
  return {y, mean, var};
}

std::vector<Tensor> dwconv_bn_act_backward(const Tensor& grad_y_in, const Tensor& x_in, const Tensor& w_dw,
                                           const Tensor& b_dw, const Tensor& w_pw, const Tensor& b_pw,
                                           const Tensor& gamma, const Tensor& beta, const Tensor& mean_in,
                                           const Tensor& var_in, bool training, double eps, bool relu) {
  const char* op = "cuda_dwconv_bn_act_backward";
  const Checked c = check_inputs(op, x_in, w_dw, b_dw, w_pw, b_pw, gamma, beta);
  const c10::cuda::CUDAGuard guard(c.x.device());
  const int64_t Cin = c.p.Cin, Cout = c.p.Cout, k = c.p.k;
  check_act(grad_y_in, op, "grad_y", c.x, {c.p.N, Cout, c.p.H, c.p.W});
  const Tensor grad_y = dense(grad_y_in);
  const Tensor mean = param(mean_in, op, "mean", c.x, {Cout}, true);
  const Tensor var = param(var_in, op, "var", c.x, {Cout}, true);

  Tensor grad_x = at::empty(c.x.sizes(), c.x.options().memory_format(format_of(c.x)));
  const auto f32 = c.x.options().dtype(at::kFloat);
  Tensor g_w_dw = at::empty({Cin, k * k}, f32), g_b_dw = at::empty({Cin}, f32);
  Tensor g_w_pw = at::empty({Cout, Cin}, f32), g_b_pw = at::empty({Cout}, f32);
  Tensor g_gamma = at::empty({Cout}, f32), g_beta = at::empty({Cout}, f32);
  const cuda::DwConvGrads grads{g_w_dw.data_ptr<float>(), g_b_dw.data_ptr<float>(), g_w_pw.data_ptr<float>(),
                                g_b_pw.data_ptr<float>(), g_gamma.data_ptr<float>(), g_beta.data_ptr<float>()};
  Tensor ws = workspace(c.x, cuda::dwconv_backward_workspace(c.p));
  const cudaError_t err = cuda::dwconv_backward(c.p, view4(grad_y), view4(c.x), params_of(c), mean.data_ptr<float>(),
                                                var.data_ptr<float>(), training, (float)eps, relu, view4(grad_x),
                                                grads, ws.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, op);
  return {grad_x,
          g_w_dw.view({Cin, 1, k, k}).to(w_dw.scalar_type()),
          g_b_dw.to(b_dw.scalar_type()),
          g_w_pw.view({Cout, Cin, 1, 1}).to(w_pw.scalar_type()),
          g_b_pw.to(b_pw.scalar_type()),
          g_gamma.to(gamma.scalar_type()),
          g_beta.to(beta.scalar_type())};
}

}  // namespace cuda_glue
}  // namespace dlkunet
