// Registers the CPU kernels on dlkunet._C under the names dlkunet/ops/extension.py looks up.
#include "common.h"
#include "../bindings.h"

namespace dlkunet {
namespace cpu {
std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                                          const Tensor& w_pw, const Tensor& b_pw,
                                                          const Tensor& gamma, const Tensor& beta,
                                                          const Tensor& running_mean, const Tensor& running_var,
                                                          bool training, double eps, bool relu);
std::vector<Tensor> dwconv_bn_act_backward(const Tensor& grad_y, const Tensor& x, const Tensor& w_dw,
                                           const Tensor& b_dw, const Tensor& w_pw, const Tensor& b_pw,
                                           const Tensor& gamma, const Tensor& beta, const Tensor& mean,
                                           const Tensor& var, bool training, double eps, bool relu);
Tensor depthwise_forward(const Tensor& x, const Tensor& w, const Tensor& b, int64_t dilation);
Tensor lka_gate_forward(const Tensor& x, const Tensor& w0, const Tensor& b0, const Tensor& ws, const Tensor& bs,
                        const Tensor& w1, const Tensor& b1, int64_t dilation);
std::vector<Tensor> lka_gate_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w0, const Tensor& b0,
                                      const Tensor& ws, const Tensor& bs, const Tensor& w1, const Tensor& b1,
                                      int64_t dilation);
Tensor upsample_concat_forward(const Tensor& deep, const Tensor& skip, const Tensor& w, const Tensor& b);
Tensor max_pool2x2_forward(const Tensor& x);
}  // namespace cpu

namespace {
// The tiles' GEMM on whole tensors, for its tests: a (M x K) times b (K x N), or times b^T when b is
// given as (N x K) with b_transposed.
at::Tensor tile_gemm_for_tests(const at::Tensor& a, const at::Tensor& b, bool b_transposed, bool all_threads) {
  TORCH_CHECK(cpu::tile_gemm_available(), "cpu_tile_gemm: not used on this machine (see cpu_tile_gemm_available)");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "cpu_tile_gemm takes 2-D float32 tensors");
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  const int64_t M = A.size(0), K = A.size(1), N = b_transposed ? B.size(0) : B.size(1);
  TORCH_CHECK((b_transposed ? B.size(1) : B.size(0)) == K, "cpu_tile_gemm: inner sizes differ");
  at::Tensor C = at::empty({M, N}, A.options());
  if (all_threads) {
    cpu::weight_gemm<float>(A.data_ptr<float>(), K, B.data_ptr<float>(), b_transposed, C.data_ptr<float>(), N, M, N, K);
    return C;
  }
  const cpu::PackedB packed(B.data_ptr<float>(), B.size(1), b_transposed, N, K);
  cpu::tile_gemm(A.data_ptr<float>(), K, packed, C.data_ptr<float>(), N, M);
  return C;
}

// How many threads an at::parallel_for inside this extension runs on.  The kernels are only as
// parallel as this: built without OpenMP it is 1 however many threads torch has (tested).
int64_t parallel_threads() {
  std::vector<char> seen(static_cast<size_t>(std::max(1, at::get_num_threads())), 0);
  at::parallel_for(0, 1 << 16, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(seen.size())) seen[t] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}
}  // namespace

void bind_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cpu_parallel_threads", &parallel_threads,
        "the number of threads an at::parallel_for inside the extension uses (torch.get_num_threads() "
        "when the extension was built with torch's threading)");
  m.def("cpu_isa", [] { return std::string(cpu::blocked_isa()); },
        "the instruction set of the blocked depthwise kernels picked at load time (avx512, avx2, generic)");
  m.def("cpu_tile_gemm_available", &cpu::tile_gemm_available,
        "whether the tiles' pointwise GEMMs run dlkunet's AVX2 kernel here (else at::mm)");
  m.def("cpu_tile_gemm", &tile_gemm_for_tests,
        "(a, b, b_transposed, all_threads) -> a @ b (or a @ b.T): the tile GEMM on the calling thread, or the "
        "whole-batch GEMM (weight packing included) on all threads; for tests and benchmarks",
        py::arg("a"), py::arg("b"), py::arg("b_transposed"), py::arg("all_threads") = false);
  m.def("cpu_scratch_bytes", &cpu::scratch_bytes,
        "bytes of scratch the cpu kernels keep for the calling thread between calls");
  m.def("cpu_cached_output_bytes", &cpu::cached_output_bytes,
        "bytes of freed output blocks the cpu kernels keep for their next outputs (all threads)");
  m.def("cpu_output_cache_limit", &cpu::output_cache_limit,
        "the most bytes of freed output blocks the cache keeps (DLKUNET_CPU_CACHE_MB, else 1/4 of physical memory)");
  m.def("cpu_release_scratch", &cpu::release_scratch,
        "frees the calling thread's cpu-kernel scratch and the cached output blocks; returns the bytes freed");
  // The kernels run without the GIL: they touch no Python objects.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("cpu_dwconv_bn_act_forward", &cpu::dwconv_bn_act_forward, nogil,
        "(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, training, eps, relu) -> (y, mean, var)",
        py::arg("x"), py::arg("w_dw"), py::arg("b_dw"), py::arg("w_pw"), py::arg("b_pw"), py::arg("gamma"),
        py::arg("beta"), py::arg("running_mean"), py::arg("running_var"), py::arg("training"), py::arg("eps"),
        py::arg("relu"));
  m.def("cpu_dwconv_bn_act_backward", &cpu::dwconv_bn_act_backward, nogil,
        "(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, training, eps, relu) -> 7 gradients",
        py::arg("grad_y"), py::arg("x"), py::arg("w_dw"), py::arg("b_dw"), py::arg("w_pw"), py::arg("b_pw"),
        py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("var"), py::arg("training"), py::arg("eps"),
        py::arg("relu"));
  m.def("cpu_depthwise_forward", &cpu::depthwise_forward, nogil,
        "(x, w, b, dilation) -> float32 depthwise conv (padding keeps H x W), the blocked row kernel alone "
        "(tests and benchmarks)", py::arg("x"), py::arg("w"), py::arg("b"), py::arg("dilation"));
  m.def("cpu_lka_gate_forward", &cpu::lka_gate_forward, nogil,
        "(x, w0, b0, ws, bs, w1, b1, dilation) -> out", py::arg("x"), py::arg("w0"), py::arg("b0"), py::arg("ws"),
        py::arg("bs"), py::arg("w1"), py::arg("b1"), py::arg("dilation"));
  m.def("cpu_upsample_concat_forward", &cpu::upsample_concat_forward, nogil,
        "(deep, skip, w, b) -> cat([skip, pad(conv_transpose2d(deep, w, b, stride=2))], 1), channels_last; "
        "float32/float64, skip at least twice deep's size", py::arg("deep"), py::arg("skip"), py::arg("w"),
        py::arg("b"));
  m.def("cpu_max_pool2x2_forward", &cpu::max_pool2x2_forward, nogil,
        "(x) -> max_pool2d(x, 2): window and stride 2, floor mode, no indices; x's layout", py::arg("x"));
  m.def("cpu_lka_gate_backward", &cpu::lka_gate_backward, nogil,
        "(grad_out, x, w0, b0, ws, bs, w1, b1, dilation) -> 7 gradients", py::arg("grad_out"), py::arg("x"),
        py::arg("w0"), py::arg("b0"), py::arg("ws"), py::arg("bs"), py::arg("w1"), py::arg("b1"),
        py::arg("dilation"));
}

}  // namespace dlkunet
