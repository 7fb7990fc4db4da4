// Large-kernel attention with its Hadamard gate on the CPU: out = x * (w1 @ dws(dw0(x)) + b1).
//
// a1 = dw0(x) is computed once for the whole batch (NHWC, compute type), because the dilated conv
// reads a 19-row window of it (ks 7, dilation 3) and recomputing that halo per tile would cost more
// than one write and read of a1.  Then, for large maps, per tile of rows: a2 into an L2-resident
// buffer, the pointwise GEMM, and the gate in one epilogue; for small maps (plan_tiles) whole-batch
// buffers and one multi-threaded GEMM.  The backward recomputes a1 and a2 from x (nothing saved by
// the forward) and walks the chain back: the pointwise and gate parts per tile on the same plan,
// then the two depthwise convs row by row (transposed conv = conv with the kernel rotated 180 degrees).
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
  s.k0 = check_depthwise(op, "w0", w0, s.C);
  check_shape(op, "b0", b0, {s.C});
  s.ks = check_depthwise(op, "ws", ws, s.C);
  check_shape(op, "bs", bs, {s.C});
  check_shape(op, "w1", w1, {s.C, s.C, 1, 1});
  check_shape(op, "b1", b1, {s.C});
  DLK_CHECK(dilation >= 1, op, " dilation ", dilation);
  return s;
}

// The pointwise GEMM and the gate on one tile of Pt pixels starting at element `base` of x / out
// (channels_last: pixels x C, ld C; NCHW: C x pixels, ld HW): out = x * (w1 @ a2 + b1).  a2 is the
// tile's (Pt x C) depthwise output with pixel stride lda; tmp (Pt x C of T) is used for half types.
template <typename scalar_t, typename T>
void pointwise_gate_tile(bool cl, const T* a2, int64_t lda, const TileWeight<T>& w1, const T* b1p, int64_t C,
                         int64_t Pt, int64_t HW, int64_t base, const scalar_t* xp, scalar_t* op, T* tmp) {
  const int64_t ld = cl ? C : HW;
  const int64_t R = cl ? Pt : C, Cn = cl ? C : Pt;  // the block as rows x columns
  if constexpr (std::is_same<scalar_t, T>::value) {
    T* O = op + base;
    if (cl) w1.times(a2, lda, O, ld, Pt);
    else gemm<T>(false, w1.W, C, true, a2, lda, O, ld, C, Pt, C, false);
    gate(O, ld, xp + base, ld, O, ld, R, Cn, b1p, cl);
  } else {  // float16 / bfloat16: the GEMM into float scratch, the gate converting
    if (cl) w1.times(a2, lda, tmp, Cn, Pt);
    else gemm<T>(false, w1.W, C, true, a2, lda, tmp, Cn, C, Pt, C, false);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < Cn; ++c) {
        const T bias = cl ? b1p[c] : b1p[r];
        const T xv = static_cast<T>(xp[base + r * ld + c]);
        op[base + r * ld + c] = static_cast<scalar_t>(xv * (tmp[r * Cn + c] + bias));
      }
  }
}

// The two depthwise convs of one image, streamed row by row for channel blocks [cb0, cb1): x rows
// are packed into a ring of padded blocked rows (2*p0 + 1 of them), a1 rows computed into a second
// ring (2*ps + 1), so a1 is never a full tensor and each of its rows is computed once per stream.
// a2_row(cb, r, ...) must be called with increasing r for each block, from the row given to start.
class LkaStream {
 public:
  LkaStream(const float* img, const Shapes& s, int64_t cb0, int64_t cb1, const float* w0b, const float* b0b,
            const float* wsb, const float* bsb, AlignedVector<float>& buf)
      : img_(img), s_(s), cb0_(cb0), nb_(cb1 - cb0), p0_((s.k0 - 1) / 2), ps_(s.dil * (s.ks - 1) / 2),
        rx_(2 * p0_ + 1), ra_(2 * ps_ + 1), wx_((s.W + 2 * p0_) * kBlock), wa_((s.W + 2 * ps_) * kBlock),
        w0b_(w0b), b0b_(b0b), wsb_(wsb), bsb_(bsb), next_x_(nb_), next_a_(nb_) {
    const int64_t need = nb_ * (rx_ * wx_ + ra_ * wa_);
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
    xr_ = buf.data();
    ar_ = xr_ + nb_ * rx_ * wx_;
    // a1's padding columns stay zero; rows are written between them only.
    for (int64_t i = 0; i < nb_ * ra_; ++i) {
      float* row = ar_ + i * wa_;
      std::fill(row, row + ps_ * kBlock, 0.f);
      std::fill(row + (ps_ + s.W) * kBlock, row + wa_, 0.f);
    }
  }

  void start(int64_t r0) {
    const int64_t a = std::max<int64_t>(0, r0 - ps_);
    std::fill(next_a_.begin(), next_a_.end(), a);
    std::fill(next_x_.begin(), next_x_.end(), std::max<int64_t>(0, a - p0_));
  }

  void a2_row(int64_t cb, int64_t r, float* out, int64_t ldo) {
    const int64_t b = cb - cb0_, H = s_.H, W = s_.W, C = s_.C;
    const float* rows[kMaxKernel];
    int wrows[kMaxKernel];
    for (int64_t& q = next_a_[b]; q <= std::min(H - 1, r + ps_); ++q) {
      for (int64_t& nx = next_x_[b]; nx <= std::min(H - 1, q + p0_); ++nx)
        pack_row_blocked(img_ + nx * W * C, W, C, cb, p0_, xrow(b, nx));
      int n = 0;
      for (int64_t i = 0; i < s_.k0; ++i) {
        const int64_t ih = q + i - p0_;
        if (ih >= 0 && ih < H) { rows[n] = xrow(b, ih); wrows[n++] = static_cast<int>(i); }
      }
      dw_row_blocked(rows, wrows, n, w0b_ + cb * s_.k0 * s_.k0 * kBlock, b0b_ + cb * kBlock, s_.k0, 1, W,
                     arow(b, q) + ps_ * kBlock, kBlock);
    }
    int n = 0;
    for (int64_t i = 0; i < s_.ks; ++i) {
      const int64_t ih = r + i * s_.dil - ps_;
      if (ih >= 0 && ih < H) { rows[n] = arow(b, ih); wrows[n++] = static_cast<int>(i); }
    }
    dw_row_blocked(rows, wrows, n, wsb_ + cb * s_.ks * s_.ks * kBlock, bsb_ + cb * kBlock, s_.ks, s_.dil, W, out, ldo);
  }

 private:
  float* xrow(int64_t b, int64_t r) { return xr_ + (b * rx_ + r % rx_) * wx_; }
  float* arow(int64_t b, int64_t r) { return ar_ + (b * ra_ + r % ra_) * wa_; }

  const float* img_;
  Shapes s_;
  int64_t cb0_, nb_, p0_, ps_, rx_, ra_, wx_, wa_;
  const float *w0b_, *b0b_, *wsb_, *bsb_;
  std::vector<int64_t> next_x_, next_a_;
  float *xr_ = nullptr, *ar_ = nullptr;
};

// Thread-local buffers of the streamed forward, kept between calls (as scratch.cpp's).
AlignedVector<float>& stream_buffer() { thread_local AlignedVector<float> b; return b; }
AlignedVector<float>& tile_buffer() { thread_local AlignedVector<float> b; return b; }

// float32 compute (float32, float16 and bfloat16 inputs): the blocked, streamed depthwise pair.
// Large maps: each task takes a run of rows of one image (a stream, so a1's halo is computed once
// per run, not per tile) and, per tile of a few rows, a2 for all channels, the pointwise GEMM on
// the tile and the gate.  Small maps: one stream per (image, channel block) over the whole image
// into a whole-batch a2, then one multi-threaded GEMM and the gate.
template <typename scalar_t>
Tensor forward_blocked(const Tensor& x_in, const Tensor& w0, const Tensor& b0, const Tensor& ws, const Tensor& bs,
                       const Tensor& w1, const Tensor& b1, const Shapes& s) {
  const auto fmt = output_format(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t C = s.C, HW = s.H * s.W, P = s.N * HW, nb = blocks_of(C), Cp = nb * kBlock;
  Tensor x = x_in.contiguous(fmt);
  Tensor X = to_nhwc(x, at::kFloat, Slot::kInput);
  Tensor w0b = block_taps(w0), b0b = block_bias(b0), wsb = block_taps(ws), bsb = block_bias(bs);
  Tensor W1 = w1.reshape({C, C}).to(at::kFloat).contiguous(), b1c = b1.to(at::kFloat).contiguous();
  const float *W1p = W1.data_ptr<float>(), *b1p = b1c.data_ptr<float>(), *Xp = X.data_ptr<float>();
  const float *w0p = w0b.data_ptr<float>(), *b0p = b0b.data_ptr<float>(), *wsp = wsb.data_ptr<float>(),
              *bsp = bsb.data_ptr<float>();
  const TilePlan plan = plan_tiles(s.N, s.H, s.W, 2 * C, sizeof(float));

  if (plan.whole) {
    Tensor A2 = scratch(Slot::kDepthwise2, {P, Cp}, at::kFloat), O = output_like(X);  // O may become the output
    float *A2p = A2.data_ptr<float>(), *Op = O.data_ptr<float>();
    for_each_task(s.N * nb, [&](int64_t t) {
      const int64_t n = t / nb, cb = t % nb;
      LkaStream st(Xp + n * HW * C, s, cb, cb + 1, w0p, b0p, wsp, bsp, stream_buffer());
      st.start(0);
      for (int64_t r = 0; r < s.H; ++r) st.a2_row(cb, r, A2p + (n * HW + r * s.W) * Cp + cb * kBlock, Cp);
    });
    weight_gemm<float>(A2p, Cp, W1p, true, Op, C, P, C, C);
    for_each_chunk(P, kChunk, [&](int64_t, int64_t p0, int64_t p1) {
      gate(Op + p0 * C, C, Xp + p0 * C, C, Op + p0 * C, C, p1 - p0, C, b1p, true);
    });
    return from_nhwc(O, x);
  }

  // Runs of rows: enough of them to occupy the threads, as long as possible (each run recomputes
  // a1's halo of 2 * ps rows).  Tiles: rows whose GEMM has a few hundred pixels.
  const int64_t threads = at::get_num_threads();
  const int64_t per_img = s.N >= threads ? 1 : std::min(s.H, (threads + s.N - 1) / s.N);
  const int64_t run = (s.H + per_img - 1) / per_img;
  const int64_t tile = std::max<int64_t>(1, std::min(run, (384 + s.W - 1) / s.W));
  Tensor out = output_like(x);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  constexpr bool direct = std::is_same<scalar_t, float>::value;
  const TileWeight<float> w1t(W1p, true, C, C, cl);
  const int64_t tile_elems = tile * s.W * Cp + (direct ? 0 : tile * s.W * C);
  for_each_task(s.N * per_img, [&](int64_t task) {
    const int64_t n = task / per_img, R0 = (task % per_img) * run, R1 = std::min(s.H, R0 + run);
    if (R0 >= R1) return;
    SingleThreadedBlas blas_guard;
    AlignedVector<float>& tb = tile_buffer();
    if (static_cast<int64_t>(tb.size()) < tile_elems) tb.resize(tile_elems);
    float* a2 = tb.data();
    LkaStream st(Xp + n * HW * C, s, 0, nb, w0p, b0p, wsp, bsp, stream_buffer());
    st.start(R0);
    for (int64_t r0 = R0; r0 < R1; r0 += tile) {
      const int64_t r1 = std::min(R1, r0 + tile), Pt = (r1 - r0) * s.W;
      for (int64_t cb = 0; cb < nb; ++cb)
        for (int64_t r = r0; r < r1; ++r) st.a2_row(cb, r, a2 + (r - r0) * s.W * Cp + cb * kBlock, Cp);
      const int64_t base = cl ? (n * HW + r0 * s.W) * C : n * C * HW + r0 * s.W;
      pointwise_gate_tile<scalar_t, float>(cl, a2, Cp, w1t, b1p, C, Pt, HW, base, xp, op, a2 + tile * s.W * Cp);
    }
  });
  return out;
}

template <typename scalar_t>
Tensor forward_impl(const Tensor& x_in, const Tensor& w0, const Tensor& b0, const Tensor& ws, const Tensor& bs,
                    const Tensor& w1, const Tensor& b1, const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  if constexpr (std::is_same<T, float>::value) {
    if (!blocked_disabled()) return forward_blocked<scalar_t>(x_in, w0, b0, ws, bs, w1, b1, s);
  }
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const auto fmt = output_format(x_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t C = s.C, HW = s.H * s.W, P = s.N * HW, img = HW * C;
  Tensor x = x_in.contiguous(fmt);
  Tensor X = to_nhwc(x, ct, Slot::kInput);
  Tensor A1 = scratch(Slot::kDepthwise, X.sizes(), ct), w0t = taps_major(w0, ct, false), b0c = b0.to(ct).contiguous();
  depthwise_all(X.data_ptr<T>(), s.N, s.H, s.W, C, w0t.data_ptr<T>(), b0c.data_ptr<T>(), s.k0, 1, A1.data_ptr<T>());
  Tensor wst = taps_major(ws, ct, false), bsc = bs.to(ct).contiguous();
  Tensor W1 = w1.reshape({C, C}).to(ct).contiguous(), b1c = b1.to(ct).contiguous();
  const T *W1p = W1.data_ptr<T>(), *b1p = b1c.data_ptr<T>(), *A1p = A1.data_ptr<T>();
  const TilePlan plan = plan_tiles(s.N, s.H, s.W, 2 * C, sizeof(T));

  if (plan.whole) {
    Tensor A2 = scratch(Slot::kDepthwise2, X.sizes(), ct), O = output_like(X);  // O may become the output
    T *A2p = A2.data_ptr<T>(), *Op = O.data_ptr<T>();
    const T* Xp = X.data_ptr<T>();
    depthwise_all(A1p, s.N, s.H, s.W, C, wst.data_ptr<T>(), bsc.data_ptr<T>(), s.ks, s.dil, A2p);
    gemm<T>(false, A2p, C, true, W1p, C, Op, C, P, C, C, false);
    for_each_chunk(P, kChunk, [&](int64_t, int64_t p0, int64_t p1) {
      gate(Op + p0 * C, C, Xp + p0 * C, C, Op + p0 * C, C, p1 - p0, C, b1p, true);
    });
    return from_nhwc(O, x);
  }

  // Tiled: per tile of rows, a2 into an L2-resident buffer, the pointwise GEMM, the gate.
  Tensor out = output_like(x);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  constexpr bool direct = std::is_same<scalar_t, T>::value;
  const int64_t scratch = plan.rows * s.W * C * (direct ? 1 : 2);  // a2, and float output for half types
  const TileWeight<T> w1t(W1p, true, C, C, false);  // the unblocked path keeps at::mm (the A/B baseline)
  for_each_tile<T>(plan, s.H, scratch, [&](int64_t, int64_t n, int64_t r0, int64_t r1, T* a2) {
    const int64_t P = (r1 - r0) * s.W;
    depthwise_rows(A1p + n * img, s.H, s.W, C, r0, r1, wst.data_ptr<T>(), bsc.data_ptr<T>(), s.ks, s.dil, a2);
    const int64_t base = cl ? (n * HW + r0 * s.W) * C : n * C * HW + r0 * s.W;
    pointwise_gate_tile<scalar_t, T>(cl, a2, C, w1t, b1p, C, P, HW, base, xp, op, a2 + plan.rows * s.W * C);
  });
  return out;
}

template <typename scalar_t>
std::vector<Tensor> backward_impl(const Tensor& grad_out, const Tensor& x, const Tensor& w0, const Tensor& b0,
                                  const Tensor& ws, const Tensor& bs, const Tensor& w1, const Tensor& b1,
                                  const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const int64_t C = s.C, W = s.W, img = s.H * s.W * s.C, P = s.N * s.H * s.W;
  Tensor X = to_nhwc(x, ct, Slot::kInput), G = to_nhwc(grad_out, ct, Slot::kGrad);
  Tensor W1 = w1.reshape({C, C}).to(ct).contiguous(), b1c = b1.to(ct).contiguous();
  Tensor A1 = scratch(Slot::kDepthwise, X.sizes(), ct), A2 = scratch(Slot::kDepthwise2, X.sizes(), ct);
  Tensor O = scratch(Slot::kPointwise, X.sizes(), ct), GX = output_like(X);
  const T *Xp = X.data_ptr<T>(), *Gp = G.data_ptr<T>(), *W1p = W1.data_ptr<T>(), *b1p = b1c.data_ptr<T>();
  T *A1p = A1.data_ptr<T>(), *A2p = A2.data_ptr<T>(), *Op = O.data_ptr<T>(), *GXp = GX.data_ptr<T>();

  // Recompute a1, a2 and the pointwise output (nothing is saved by the forward), then the gate's
  // backward: grad_x = g * attn (the direct term), O <- dattn = g * x; then the pointwise
  // backward: grad w1 = dattn^T @ a2, A2 <- da2 = dattn @ w1.  Large maps go tile by tile as in
  // the forward (each thread's GEMMs single-threaded on L2-resident rows, its own share of
  // grad w1); small maps take whole-batch GEMMs.
  Tensor w0t = taps_major(w0, ct, false), b0c = b0.to(ct).contiguous();
  Tensor wst = taps_major(ws, ct, false), bsc = bs.to(ct).contiguous();
  depthwise_all(Xp, s.N, s.H, W, C, w0t.data_ptr<T>(), b0c.data_ptr<T>(), s.k0, 1, A1p);
  ThreadSums<double> gb1(C);
  auto gate_rows = [&](int64_t p0, int64_t p1) {
    std::vector<T> acc(static_cast<size_t>(C));
    for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {  // short float partial sums, as in the whole plan
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t c1 = std::min(p1, c0 + kChunk);
      gate_backward(Gp + c0 * C, Xp + c0 * C, Op + c0 * C, b1p, GXp + c0 * C, c1 - c0, C, acc.data());
      double* mine = gb1.mine();
      for (int64_t c = 0; c < C; ++c) mine[c] += acc[c];
    }
  };
  const TilePlan plan = plan_tiles(s.N, s.H, s.W, 2 * C, sizeof(T));
  Tensor gw1;
  if (plan.whole) {
    depthwise_all(A1p, s.N, s.H, W, C, wst.data_ptr<T>(), bsc.data_ptr<T>(), s.ks, s.dil, A2p);
    gemm<T>(false, A2p, C, true, W1p, C, Op, C, P, C, C, false);
    for_each_chunk(P, kChunk, [&](int64_t, int64_t p0, int64_t p1) { gate_rows(p0, p1); });
    gw1 = at::empty({C, C}, X.options());
    gemm<T>(true, Op, C, false, A2p, C, gw1.data_ptr<T>(), C, C, C, P, false);
    gemm<T>(false, Op, C, false, W1p, C, A2p, C, P, C, C, false);
  } else {
    ThreadSums<T> gw1_part(C * C);
    for_each_tile<T>(plan, s.H, 0, [&](int64_t, int64_t n, int64_t r0, int64_t r1, T*) {
      const int64_t p0 = (n * s.H + r0) * W, p1 = (n * s.H + r1) * W;
      T *a2 = A2p + p0 * C, *o = Op + p0 * C;
      depthwise_rows(A1p + n * img, s.H, W, C, r0, r1, wst.data_ptr<T>(), bsc.data_ptr<T>(), s.ks, s.dil, a2);
      gemm<T>(false, a2, C, true, W1p, C, o, C, p1 - p0, C, C, false);
      gate_rows(p0, p1);
      gemm<T>(true, o, C, false, a2, C, gw1_part.mine(), C, C, C, p1 - p0, true);
      gemm<T>(false, o, C, false, W1p, C, a2, C, p1 - p0, C, C, false);
    }, /*fixed_split=*/true);
    gw1 = gw1_part.total().reshape({C, C});
  }
  T* DA2p = A2p;
  T* DA1p = Op;  // dattn is spent

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
          gw1.reshape({C, C, 1, 1}).to(w1.scalar_type()),
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
  check_shape(kBwd, "grad_out", grad_out, x.sizes());
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_lka_gate_backward", [&] {
    out = backward_impl<scalar_t>(grad_out, x, w0, b0, ws, bs, w1, b1, s);
  });
  return out;
}

}  // namespace cpu
}  // namespace dlkunet
