// Declarations shared by the extension's translation units: each device registers its kernels.
#pragma once
#include <torch/extension.h>

namespace dlkunet {
// csrc/cpu/*.cpp: defines cpu_dwconv_bn_act_{forward,backward} and cpu_lka_gate_{forward,backward}.
void bind_cpu(pybind11::module_& m);
#ifdef DLKUNET_WITH_CUDA
// csrc/cuda/*.cpp: defines cuda_dwconv_bn_act_{forward,backward} and cuda_lka_gate_{forward,backward}.
void bind_cuda(pybind11::module_& m);
#endif
}  // namespace dlkunet
