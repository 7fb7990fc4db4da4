// Large-kernel attention with its Hadamard gate on the CPU: out = x * (w1 @ dws(dw0(x)) + b1).
//
// a1 = dw0(x) is computed once for the whole batch (NHWC, compute type), because the dilated conv
// reads a 19-row window of it (ks 7, dilation 3) and recomputing that halo per tile would cost more
// than one write and read of a1.  Then per tile of rows: a2 into an L2-resident buffer, the pointwise
// GEMM, and the gate in one epilogue.  The backward recomputes a1 and a2 from x (nothing saved by
// the forward), then walks the chain back: pointwise and gate per tile, the two depthwise convs row
// by row (transposed conv = conv with the kernel rotated 180 degrees).
#include "common.h"

#include <type_traits>

namespace dlkunet {
namespace cpu {
namespace {

const char* kFwd = "cpu_lka_gate_forward";
const char* kBwd = "cpu_lka_gate_backward";

struct Shapes {
  int64_t N, C, H, W, k0, ks, dil;
};

Shapes check_common(const char* op, const Tensor& x, const Tensor& w0, const Tensor& b0, const Tensor& ws,
                    const Tensor& bs, const Tensor& w1, const Tensor& b1, int64_t dilation) {
  check_x(op, "x", x);
  Shapes s{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, dilation};
  s.k0 = check_depthwise(op, "w0", w0, x);
  check_like_x(op, "b0", b0, x, {s.C}, false);
  s.ks = check_depthwise(op, "ws", ws, x);
  check_like_x(op, "bs", bs, x, {s.C}, false);
  check_like_x(op, "w1", w1, x, {s.C, s.C, 1, 1}, false);
  check_like_x(op, "b1", b1, x, {s.C}, false);
  TORCH_CHECK(dilation >= 1 && dilation <= 64, op, ": dilation must be in [1, 64], got ", dilation);
  return s;
}

// A1 = dw0(X) + b0 for the whole batch, row-parallel.
template <typename T>
Tensor first_conv(const Tensor& X, const Tensor& w0t, const Tensor& b0, const Shapes& s) {
  Tensor A1 = at::empty_like(X);
  const T *Xp = X.data_ptr<T>(), *wp = w0t.data_ptr<T>(), *bp = b0.data_ptr<T>();
  T* Ap = A1.data_ptr<T>();
  const int64_t img = s.H * s.W * s.C;
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      dw_row(Xp + (r / s.H) * img, s.H, s.W, s.C, r % s.H, wp, bp, s.k0, 1, Ap + r * s.W * s.C, false);
  });
  return A1;
}

// Calls body(n, r0, r1, a2_tile, scratch) per tile of rows, with a2 = dws(A1) + bs in the tile.
template <typename T, typename Body>
void for_each_a2_tile(const T* A1, const Shapes& s, const T* wst, const T* bs, int64_t rows, int64_t scratch_elems,
                      const Body& body) {
  const int64_t per_img = (s.H + rows - 1) / rows, img = s.H * s.W * s.C;
  at::parallel_for(0, s.N * per_img, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    std::vector<T> buf(static_cast<size_t>(rows * s.W * s.C + scratch_elems));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / per_img, r0 = (t % per_img) * rows, r1 = std::min(s.H, r0 + rows);
      for (int64_t r = r0; r < r1; ++r)
        dw_row(A1 + n * img, s.H, s.W, s.C, r, wst, bs, s.ks, s.dil, buf.data() + (r - r0) * s.W * s.C, false);
      body(n, r0, r1, buf.data(), buf.data() + rows * s.W * s.C);
    }
  });
}

template <typename scalar_t>
Tensor forward_impl(const Tensor& x_in, const Tensor& w0, const Tensor& b0, const Tensor& ws, const Tensor& bs,
                    const Tensor& w1, const Tensor& b1, const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const auto fmt = output_format(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t C = s.C, HW = s.H * s.W;
  Tensor x = x_in.contiguous(fmt);
  Tensor X = to_nhwc(x, ct);
  Tensor A1 = first_conv<T>(X, taps_major(w0, ct, false), b0.to(ct).contiguous(), s);
  Tensor wst = taps_major(ws, ct, false), bsc = bs.to(ct).contiguous();
  Tensor W1 = w1.reshape({C, C}).to(ct).contiguous(), b1c = b1.to(ct).contiguous();
  Tensor out = at::empty_like(x);
  const T *W1p = W1.data_ptr<T>(), *b1p = b1c.data_ptr<T>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  constexpr bool direct = std::is_same<scalar_t, T>::value;
  const int64_t rows = tile_rows(s.H, s.W, 2 * C, sizeof(T));
  for_each_a2_tile<T>(A1.data_ptr<T>(), s, wst.data_ptr<T>(), bsc.data_ptr<T>(), rows, direct ? 0 : rows * s.W * C,
                      [&](int64_t n, int64_t r0, int64_t r1, T* a2, T* scratch) {
    const int64_t P = (r1 - r0) * s.W;
    const int64_t base = cl ? (n * HW + r0 * s.W) * C : n * C * HW + r0 * s.W;
    const int64_t ld = cl ? C : HW;
    T* O = direct ? reinterpret_cast<T*>(op + base) : scratch;
    const int64_t ldo = direct ? ld : (cl ? C : P);
    if (cl) gemm<T>(false, a2, C, true, W1p, C, O, ldo, P, C, C, false);
    else gemm<T>(false, W1p, C, true, a2, C, O, ldo, C, P, C, false);
    const scalar_t* xs = xp + base;
    scalar_t* d = op + base;
    if (cl) {
      for (int64_t p = 0; p < P; ++p)
        for (int64_t c = 0; c < C; ++c)
          d[p * ld + c] = static_cast<scalar_t>(static_cast<T>(xs[p * ld + c]) * (O[p * ldo + c] + b1p[c]));
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p)
          d[c * ld + p] = static_cast<scalar_t>(static_cast<T>(xs[c * ld + p]) * (O[c * ldo + p] + b1p[c]));
    }
  });
  return out;
}

template <typename scalar_t>
std::vector<Tensor> backward_impl(const Tensor& grad_out, const Tensor& x, const Tensor& w0, const Tensor& b0,
                                  const Tensor& ws, const Tensor& bs, const Tensor& w1, const Tensor& b1,
                                  const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const int64_t C = s.C, W = s.W, img = s.H * s.W * s.C;
  Tensor X = to_nhwc(x, ct), G = to_nhwc(grad_out, ct);
  Tensor A1 = first_conv<T>(X, taps_major(w0, ct, false), b0.to(ct).contiguous(), s);
  Tensor wst = taps_major(ws, ct, false), bsc = bs.to(ct).contiguous();
  Tensor W1 = w1.reshape({C, C}).to(ct).contiguous(), b1c = b1.to(ct).contiguous();
  Tensor GX = at::empty_like(X), DA2 = at::empty_like(X), DA1 = at::empty_like(X);
  const T *Xp = X.data_ptr<T>(), *Gp = G.data_ptr<T>(), *A1p = A1.data_ptr<T>();
  const T *W1p = W1.data_ptr<T>(), *b1p = b1c.data_ptr<T>();
  T *GXp = GX.data_ptr<T>(), *DA2p = DA2.data_ptr<T>(), *DA1p = DA1.data_ptr<T>();

  // Pointwise + gate: grad_x = g * attn (the direct term), dattn = g * x, then through w1.
  ThreadSums<T> gw1(C * C), gb1(C);
  const int64_t rows = tile_rows(s.H, W, 3 * C, sizeof(T));
  for_each_a2_tile<T>(A1p, s, wst.data_ptr<T>(), bsc.data_ptr<T>(), rows, 2 * rows * W * C,
                      [&](int64_t n, int64_t r0, int64_t r1, T* a2, T* scratch) {
    const int64_t P = (r1 - r0) * W, base = (n * s.H + r0) * W * C;
    T* O = scratch;
    T* D = scratch + rows * W * C;
    gemm<T>(false, a2, C, true, W1p, C, O, C, P, C, C, false);
    T* gb = gb1.mine();
    for (int64_t p = 0; p < P; ++p) {
      const T* g = Gp + base + p * C;
      const T* xv = Xp + base + p * C;
      T* gx = GXp + base + p * C;
      for (int64_t c = 0; c < C; ++c) {
        gx[c] = g[c] * (O[p * C + c] + b1p[c]);
        const T dattn = g[c] * xv[c];
        D[p * C + c] = dattn;
        gb[c] += dattn;
      }
    }
    gemm<T>(true, D, C, false, a2, C, gw1.mine(), C, C, C, P, true);
    gemm<T>(false, D, C, false, W1p, C, DA2p + base, C, P, C, C, false);
  });

  // Dilated depthwise backward: da1 = da2 (*) rotated ws; grad ws = da2 x a1.
  Tensor wsf = taps_major(ws, ct, true), w0f = taps_major(w0, ct, true);
  ThreadSums<T> gws(s.ks * s.ks * C), gbs(C), gw0(s.k0 * s.k0 * C), gb0(C);
  const T *wsfp = wsf.data_ptr<T>(), *w0fp = w0f.data_ptr<T>();
  const T* nob = nullptr;
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / s.H, h = r % s.H;
      dw_row(DA2p + n * img, s.H, W, C, h, wsfp, nob, s.ks, s.dil, DA1p + r * W * C, false);
      dw_wgrad_row(DA2p + r * W * C, A1p + n * img, s.H, W, C, h, s.ks, s.dil, gws.mine(), gbs.mine());
    }
  });
  // First depthwise backward: grad_x += da1 (*) rotated w0; grad w0 = da1 x x.
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / s.H, h = r % s.H;
      dw_row(DA1p + n * img, s.H, W, C, h, w0fp, nob, s.k0, 1, GXp + r * W * C, true);
      dw_wgrad_row(DA1p + r * W * C, Xp + n * img, s.H, W, C, h, s.k0, 1, gw0.mine(), gb0.mine());
    }
  });

  auto dw_grad = [&](const ThreadSums<T>& g, int64_t k, const Tensor& like) {
    return g.total().reshape({k * k, C}).t().reshape({C, 1, k, k}).to(like.scalar_type()).contiguous();
  };
  return {from_nhwc(GX, x),
          dw_grad(gw0, s.k0, w0),
          gb0.total().to(b0.scalar_type()),
          dw_grad(gws, s.ks, ws),
          gbs.total().to(bs.scalar_type()),
          gw1.total().reshape({C, C, 1, 1}).to(w1.scalar_type()),
          gb1.total().to(b1.scalar_type())};
}

}  // namespace

Tensor lka_gate_forward(const Tensor& x, const Tensor& w0, const Tensor& b0, const Tensor& ws, const Tensor& bs,
                        const Tensor& w1, const Tensor& b1, int64_t dilation) {
  Shapes s = check_common(kFwd, x, w0, b0, ws, bs, w1, b1, dilation);
  c10::NoGradGuard no_grad;
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_lka_gate_forward", [&] {
    out = forward_impl<scalar_t>(x, w0, b0, ws, bs, w1, b1, s);
  });
  return out;
}

std::vector<Tensor> lka_gate_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w0, const Tensor& b0,
                                      const Tensor& ws, const Tensor& bs, const Tensor& w1, const Tensor& b1,
                                      int64_t dilation) {
  Shapes s = check_common(kBwd, x, w0, b0, ws, bs, w1, b1, dilation);
  check_cpu_float(kBwd, "grad_out", grad_out);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), kBwd, ": grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), kBwd, ": grad_out has dtype ", grad_out.scalar_type(),
              " but x is ", x.scalar_type());
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_lka_gate_backward", [&] {
    out = backward_impl<scalar_t>(grad_out, x, w0, b0, ws, bs, w1, b1, s);
  });
  return out;
}

}  // namespace cpu
}  // namespace dlkunet
