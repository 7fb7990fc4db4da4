// The decoder's join on the CPU: cat([skip, pad(conv_transpose2d(deep, w, b, stride=2))], dim=1),
// channels_last, written once into the concatenated buffer.
//
// A 2x2 stride-2 transposed convolution is one GEMM: each input pixel (h, w) gives the four output
// pixels (2h + i, 2w + j) as (Cin) x (Cin x 4 Cout), the weight as it is stored, (Cin, Cout, 2, 2):
// columns (co, i, j).  Reordering it to (i, j, co) first copied the whole weight on every call
// (19 MB for DLKUNet-L's deepest join); the scatter reads the four outputs of a channel instead.
// Per tile of input rows the GEMM goes to an L2-sized buffer and a scatter adds the bias and
// places each pixel's four Cout-vectors after the skip's channels of their output pixels; the
// same task copies the skip's channels of those output rows.  Eager PyTorch instead writes the
// upsampled map, reads it back and writes it again into cat's output (and pays page faults for
// both fresh buffers).  Small maps run one multi-threaded GEMM over the whole batch instead of
// tiles, so that the (large) weight is read once.
#include "common.h"

namespace dlkunet {
namespace cpu {
namespace {

constexpr int64_t kTileFloats = 96 * 1024;             // a tile's GEMM output: 384 KB of float32
constexpr int64_t kWholeBatchBytes = int64_t(8) << 20;  // GEMM outputs up to this: one GEMM

struct Geometry {
  int64_t N, Cin, h, w, Cout, Cs, H, W, top, left, Ctot;
};

// Output rows [R0, R1) of image n: the skip's channels, and zeros in the upsampled channels of
// padding rows and columns (rows the transposed convolution does not reach are all padding).
template <typename T>
void skip_and_padding(const Geometry& g, int64_t n, int64_t R0, int64_t R1, const T* sp, T* op) {
  for (int64_t r = R0; r < R1; ++r) {
    const bool pad_row = r < g.top || r >= g.top + 2 * g.h;
    for (int64_t c = 0; c < g.W; ++c) {
      const int64_t pix = (n * g.H + r) * g.W + c;
      T* dst = op + pix * g.Ctot;
      std::memcpy(dst, sp + pix * g.Cs, g.Cs * sizeof(T));
      if (pad_row || c < g.left || c >= g.left + 2 * g.w) std::fill(dst + g.Cs, dst + g.Ctot, T(0));
    }
  }
}

// Input pixels [p0, p1) of the whole batch, whose GEMM rows are `tile` (ld 4 Cout), into place.
template <typename T>
void scatter(const Geometry& g, const T* tile, int64_t p0, int64_t p1, const T* bias, T* op) {
  const int64_t Cout = g.Cout;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / (g.h * g.w), y = p / g.w % g.h, x = p % g.w;
    const T* src = tile + (p - p0) * 4 * Cout;  // (co, i, j)
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t r = g.top + 2 * y + i, c = g.left + 2 * x + j;
        T* dst = op + ((n * g.H + r) * g.W + c) * g.Ctot + g.Cs;
        const T* s = src + 2 * i + j;
        for (int64_t o = 0; o < Cout; ++o) dst[o] = s[4 * o] + bias[o];
      }
  }
}

template <typename T>
void run(const Geometry& g, const T* dp, const T* sp, const T* wp, const T* bp, T* op) {
  const int64_t P = g.N * g.h * g.w, cols = 4 * g.Cout;
  // Output rows each input row fills, and the padding rows above and below.
  if (P * cols * static_cast<int64_t>(sizeof(T)) <= kWholeBatchBytes) {
    Tensor buf = scratch(Slot::kPointwise, {P, cols}, c10::CppTypeToScalarType<T>::value);
    T* bufp = buf.data_ptr<T>();
    weight_gemm<T>(dp, g.Cin, wp, false, bufp, cols, P, cols, g.Cin);
    at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) skip_and_padding(g, t / g.H, t % g.H, t % g.H + 1, sp, op);
    });
    for_each_chunk(P, kChunk, [&](int64_t, int64_t p0, int64_t p1) {
      scatter(g, bufp + p0 * cols, p0, p1, bp, op);
    });
    return;
  }
  TilePlan plan;
  plan.rows = std::max<int64_t>(1, std::min(g.h, kTileFloats / (g.w * cols)));
  plan.per_img = (g.h + plan.rows - 1) / plan.rows;
  plan.count = g.N * plan.per_img;
  plan.whole = false;
  const TileWeight<T> weight(wp, false, cols, g.Cin, true);
  for_each_tile<T>(plan, g.h, plan.rows * g.w * cols, [&](int64_t, int64_t n, int64_t y0, int64_t y1, T* tile) {
    const int64_t p0 = (n * g.h + y0) * g.w, p1 = (n * g.h + y1) * g.w;
    weight.times(dp + p0 * g.Cin, g.Cin, tile, cols, p1 - p0);
    // This task's output rows; the first and last tasks of an image also take its padding rows.
    const int64_t R0 = y0 == 0 ? 0 : g.top + 2 * y0, R1 = y1 == g.h ? g.H : g.top + 2 * y1;
    skip_and_padding(g, n, R0, R1, sp, op);
    scatter(g, tile, p0, p1, bp, op);
  });
}

}  // namespace

Tensor upsample_concat_forward(const Tensor& deep, const Tensor& skip, const Tensor& w, const Tensor& b) {
  const char* op = "cpu_upsample_concat_forward";
  check_x(op, "deep", deep);
  check_x(op, "skip", skip);
  Geometry g{deep.size(0), deep.size(1), deep.size(2), deep.size(3), 0, skip.size(1), skip.size(2), skip.size(3),
             0, 0, 0};
  check_tensor(op, "w", w);
  DLK_CHECK(w.dim() == 4 && w.size(1) >= 1, op, " w has shape ", w.sizes());
  g.Cout = w.size(1);
  check_shape(op, "w", w, {g.Cin, g.Cout, 2, 2});
  check_shape(op, "b", b, {g.Cout});
  DLK_CHECK(skip.size(0) == g.N && g.H >= 2 * g.h && g.W >= 2 * g.w, op, " skip has shape ", skip.sizes(),
            " for deep of shape ", deep.sizes());
  const auto dtype = deep.scalar_type();
  DLK_CHECK((dtype == at::kFloat || dtype == at::kDouble) && skip.scalar_type() == dtype &&
                w.scalar_type() == dtype && b.scalar_type() == dtype,
            op, " dtypes ", dtype, ", ", skip.scalar_type(), ", ", w.scalar_type(), ", ", b.scalar_type());
  g.top = (g.H - 2 * g.h) / 2;
  g.left = (g.W - 2 * g.w) / 2;
  g.Ctot = g.Cs + g.Cout;
  c10::NoGradGuard no_grad;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor d = deep.contiguous(cl), s = skip.contiguous(cl), bc = b.contiguous();
  const Tensor wt = w.contiguous();  // (Cin, 4 Cout): columns (co, i, j)
  Tensor out = output_empty({g.N, g.Ctot, g.H, g.W}, skip.options(), cl);
  AT_DISPATCH_FLOATING_TYPES(dtype, "cpu_upsample_concat_forward", [&] {
    run<scalar_t>(g, d.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                  bc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace cpu
}  // namespace dlkunet
