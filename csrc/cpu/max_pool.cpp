// The encoder's 2x2 max pooling (stride 2, floor mode, as nn.MaxPool2d(2)) on the CPU, forward only.
//
// ATen's CPU kernel writes an int64 argmax beside every output even under no_grad, into two fresh
// buffers that page-fault in on every call: at batch 8, 96 channels, 224 x 224 that is 115 MB and
// most of its 65 ms in a DLKUNet-S forward (2-core EPYC).  This one writes the output only, into a
// block of the output cache.  Pooling is a pure read of x, so it runs at memory speed; the plain
// loops below vectorise at the baseline ISA, which is enough for that.
#include "common.h"

#include <cmath>

namespace dlkunet {
namespace cpu {
namespace {

constexpr int64_t kWindow = 2;  // the window and its stride

// ATen's rule: a NaN anywhere in the window wins, otherwise the largest value.
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// out[c] = max over the window whose top-left pixel is `p` (pixel stride C, row stride ld), C values.
template <typename T>
void pool_pixel_cl(const T* p, int64_t C, int64_t ld, T* out) {
  const T *a = p, *b = p + C, *c = p + ld, *d = p + ld + C;
  for (int64_t i = 0; i < C; ++i) out[i] = nan_max(nan_max(nan_max(a[i], b[i]), c[i]), d[i]);
}

// One output row of one NCHW plane: out[j] = max of rows r0, r1 at columns 2j, 2j + 1.
template <typename T>
void pool_row_nchw(const T* r0, const T* r1, int64_t Wo, T* out) {
  for (int64_t j = 0; j < Wo; ++j)
    out[j] = nan_max(nan_max(nan_max(r0[2 * j], r0[2 * j + 1]), r1[2 * j]), r1[2 * j + 1]);
}

template <typename T>
void run(const Tensor& x, Tensor& out, bool cl) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / kWindow, Wo = W / kWindow;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  if (cl) {  // a task is output rows of the batch; each pixel's window is four C-vectors
    at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / Ho, oh = row % Ho;
        const T* src = xp + ((n * H + kWindow * oh) * W) * C;
        T* dst = op + ((n * Ho + oh) * Wo) * C;
        for (int64_t ow = 0; ow < Wo; ++ow) pool_pixel_cl(src + kWindow * ow * C, C, W * C, dst + ow * C);
      }
    });
    return;
  }
  at::parallel_for(0, N * C * Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / Ho, oh = row % Ho;
      const T* src = xp + (plane * H + kWindow * oh) * W;
      pool_row_nchw(src, src + W, Wo, op + (plane * Ho + oh) * Wo);
    }
  });
}

}  // namespace

Tensor max_pool2x2_forward(const Tensor& x) {
  const char* op = "cpu_max_pool2x2_forward";
  check_x(op, "x", x);
  DLK_CHECK(x.size(2) >= kWindow && x.size(3) >= kWindow, op, " x has shape ", x.sizes());
  const at::MemoryFormat fmt = output_format(x);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor xc = x.contiguous(fmt);
  Tensor out = output_empty({x.size(0), x.size(1), x.size(2) / kWindow, x.size(3) / kWindow}, x.options(), fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_max_pool2x2_forward",
                                  [&] { run<scalar_t>(xc, out, cl); });
  return out;
}

}  // namespace cpu
}  // namespace dlkunet
