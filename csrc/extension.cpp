// dlkunet._C: the compiled kernels.  Python reaches them through dlkunet/ops/extension.py.
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlkunet fused operators: C++ CPU kernels and (when built with CUDA) CUDA kernels";
#ifdef DLKUNET_WITH_CUDA
  m.attr("with_cuda") = true;
  dlkunet::bind_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
  dlkunet::bind_cpu(m);
}
