// Registers the CUDA backend's four functions in dlkunet._C (see dlkunet/ops/extension.py).
#include "../bindings.h"
#include "glue.h"

namespace dlkunet {

void bind_cuda(pybind11::module_& m) {
  m.def("cuda_dwconv_bn_act_forward", &cuda_glue::dwconv_bn_act_forward,
        "dwconv_bn_act forward on CUDA: (y, mean, var); see dlkunet.ops.reference");
  m.def("cuda_dwconv_bn_act_backward", &cuda_glue::dwconv_bn_act_backward,
        "dwconv_bn_act backward on CUDA: grads of (x, w_dw, b_dw, w_pw, b_pw, gamma, beta)");
  m.def("cuda_lka_gate_forward", &cuda_glue::lka_gate_forward, "lka_gate forward on CUDA");
  m.def("cuda_lka_gate_backward", &cuda_glue::lka_gate_backward,
        "lka_gate backward on CUDA: grads of (x, w0, b0, ws, bs, w1, b1)");
}

}  // namespace dlkunet
