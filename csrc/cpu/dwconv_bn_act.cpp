// Fused depthwise conv -> pointwise conv -> BatchNorm -> ReLU on the CPU (forward and backward).
//
// Forward, for large maps: a tile of whole image rows of one sample; its depthwise output (pixels x
// Cin) stays in a thread-local L2-resident buffer while the pointwise GEMM consumes it, so the
// intermediate never goes to memory.  For small maps (plan_tiles) the depthwise output of the
// whole batch is one buffer and the GEMM one multi-threaded call.  Eval mode applies BatchNorm and
// both biases as a per-channel scale and shift in the GEMM's epilogue; the output is written once.
// Training needs the batch statistics first: pass 1 writes z and per-block (mean, M2), merged
// exactly (Chan et al.) in double; pass 2 normalises in place.
//
// Backward: the same plan.  Per tile, recompute the depthwise output and z, then (after the batch
// means of the BatchNorm backward, in training) dz, a per-thread share of grad w_pw and the
// depthwise output's gradient, while the tile is in L2; small maps use whole-batch GEMMs.  The
// depthwise backward then goes row by row.
#include "common.h"

#include <type_traits>
namespace dlkunet {
namespace cpu {

namespace {

const char* kFwd = "cpu_dwconv_bn_act_forward";
const char* kBwd = "cpu_dwconv_bn_act_backward";

struct Shapes {
  int64_t N, Cin, H, W, Cout, k;
};

Shapes check_common(const char* op, const Tensor& x, const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pw,
                    const Tensor& b_pw, const Tensor& gamma, const Tensor& beta, const Tensor& m, const Tensor& v,
                    const char* mname, const char* vname) {
  check_x(op, "x", x);
  Shapes s{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0};
  s.k = check_depthwise(op, "w_dw", w_dw, s.Cin);
  check_shape(op, "b_dw", b_dw, {s.Cin});
  check_tensor(op, "w_pw", w_pw);
  DLK_CHECK(w_pw.dim() == 4 && w_pw.size(0) >= 1, op, " w_pw has shape ", w_pw.sizes());
  s.Cout = w_pw.size(0);
  check_shape(op, "w_pw", w_pw, {s.Cout, s.Cin, 1, 1});
  check_shape(op, "b_pw", b_pw, {s.Cout});
  check_shape(op, "gamma", gamma, {s.Cout});
  check_shape(op, "beta", beta, {s.Cout});
  check_shape(op, mname, m, {s.Cout});
  check_shape(op, vname, v, {s.Cout});
  return s;
}

// Per-block (mean, M2, count) of z, merged in a fixed order: Chan et al.'s pairwise update, in double.
struct BlockMoments {
  int64_t C;
  std::vector<double> mean, m2;
  std::vector<int64_t> count;
  BlockMoments(int64_t blocks, int64_t channels)
      : C(channels), mean(static_cast<size_t>(blocks * channels)), m2(mean.size()), count(blocks) {}
  template <typename T>
  void set(int64_t b, const T* mu, const T* q, int64_t n) {
    for (int64_t o = 0; o < C; ++o) { mean[b * C + o] = mu[o]; m2[b * C + o] = q[o]; }
    count[b] = n;
  }
  // Returns the batch mean and biased variance, float64.
  std::pair<Tensor, Tensor> merge() const {
    auto opts = at::TensorOptions().dtype(at::kDouble);
    Tensor mu_t = at::empty({C}, opts), var_t = at::empty({C}, opts);
    double *mp = mu_t.data_ptr<double>(), *vp = var_t.data_ptr<double>();
    for (int64_t o = 0; o < C; ++o) {
      double cnt = 0, mu = 0, q = 0;
      for (size_t b = 0; b < count.size(); ++b) {
        const double nb = static_cast<double>(count[b]), mb = mean[b * C + o];
        const double tot = cnt + nb, delta = mb - mu;
        mu += delta * nb / tot;
        q += m2[b * C + o] + delta * delta * cnt * nb / tot;
        cnt = tot;
      }
      mp[o] = mu;
      vp[o] = q / cnt;
    }
    return {mu_t, var_t};
  }
};

// Depthwise weights for the forward: taps-major (k*k, C) in T, or, for float32 compute, blocked
// for the row kernels of depthwise.cpp (then the depthwise output has a padded pixel stride).
template <typename T>
struct DepthwiseWeights {
  Tensor w, b;
  bool blocked;
  DepthwiseWeights(const Tensor& w_dw, const Tensor& b_dw) {
    blocked = std::is_same<T, float>::value && !blocked_disabled();
    const auto ct = c10::CppTypeToScalarType<T>::value;
    w = blocked ? block_taps(w_dw) : taps_major(w_dw, ct, false);
    b = blocked ? block_bias(b_dw) : b_dw.to(ct).contiguous();
  }
  int64_t stride(int64_t Cin) const { return blocked ? blocks_of(Cin) * kBlock : Cin; }
};

// Rows [r0, r1) of depthwise(img) into out (pixel stride ldo); the blocked kernel for float.
template <typename T>
void depthwise_tile(const T* img, const Shapes& s, int64_t r0, int64_t r1, const DepthwiseWeights<T>& dw, T* out,
                    int64_t ldo) {
  if constexpr (std::is_same<T, float>::value) {
    if (dw.blocked) {
      dw_rows_blocked(img, s.H, s.W, s.Cin, r0, r1, 0, blocks_of(s.Cin), dw.w.template data_ptr<float>(),
                      dw.b.template data_ptr<float>(), s.k, 1, out, ldo);
      return;
    }
  }
  depthwise_rows(img, s.H, s.W, s.Cin, r0, r1, dw.w.template data_ptr<T>(), dw.b.template data_ptr<T>(), s.k, 1, out);
}

// z = pointwise(depthwise(x)) without the pointwise bias, written to zp, with post(block, ptr, ld,
// rows, cols, per_col) called on each block while it is still in cache.  Whole-batch plans write
// NHWC (pixels x Cout); tiled plans write the layout of y (channels_last, or NCHW: Cout x pixels).
template <typename T, typename Post>
int64_t pointwise_of_depthwise(const T* X, const Shapes& s, const TilePlan& plan, bool cl,
                               const DepthwiseWeights<T>& dw, const T* Wp, T* zp, const Post& post) {
  const int64_t HW = s.H * s.W, Cin = s.Cin, Cout = s.Cout, ldd = dw.stride(Cin);
  if (plan.whole) {
    const int64_t P = s.N * HW;
    Tensor D = scratch(Slot::kDepthwise, {P, ldd}, c10::CppTypeToScalarType<T>::value);
    T* Dp = D.data_ptr<T>();
    if (dw.blocked) {  // parallel over (image, block of rows)
      constexpr int64_t kRows = 8;
      const int64_t rb = (s.H + kRows - 1) / kRows;
      for_each_task(s.N * rb, [&](int64_t t) {
        const int64_t n = t / rb, r0 = t % rb * kRows, r1 = std::min(s.H, r0 + kRows);
        depthwise_tile(X + n * HW * Cin, s, r0, r1, dw, Dp + (n * HW + r0 * s.W) * ldd, ldd);
      });
    } else {
      depthwise_all(X, s.N, s.H, s.W, Cin, dw.w.template data_ptr<T>(), dw.b.template data_ptr<T>(), s.k, 1, Dp);
    }
    weight_gemm<T>(Dp, ldd, Wp, true, zp, Cout, P, Cout, Cin);
    for_each_chunk(P, kChunk, [&](int64_t b, int64_t p0, int64_t p1) {
      post(b, zp + p0 * Cout, Cout, p1 - p0, Cout, true);
    });
    return (P + kChunk - 1) / kChunk;
  }
  const TileWeight<T> weight(Wp, true, Cout, Cin, cl);
  for_each_tile<T>(plan, s.H, plan.rows * s.W * ldd, [&](int64_t t, int64_t n, int64_t r0, int64_t r1, T* tile) {
    const int64_t P = (r1 - r0) * s.W;
    depthwise_tile(X + n * HW * Cin, s, r0, r1, dw, tile, ldd);
    if (cl) {
      T* dst = zp + (n * HW + r0 * s.W) * Cout;
      weight.times(tile, ldd, dst, Cout, P);
      post(t, dst, Cout, P, Cout, true);
    } else {
      T* dst = zp + n * Cout * HW + r0 * s.W;
      gemm<T>(false, Wp, Cin, true, tile, ldd, dst, HW, Cout, P, Cin, false);
      post(t, dst, HW, Cout, P, false);
    }
  });
  return plan.count;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                                const Tensor& w_pw, const Tensor& b_pw, const Tensor& gamma,
                                                const Tensor& beta, const Tensor& running_mean,
                                                const Tensor& running_var, bool training, double eps, bool relu,
                                                const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const bool cl = output_format(x) == at::MemoryFormat::ChannelsLast;
  const int64_t HW = s.H * s.W, Cout = s.Cout;
  Tensor X = to_nhwc(x, ct, Slot::kInput);
  const DepthwiseWeights<T> dw(w_dw, b_dw);
  Tensor Wp = w_pw.reshape({Cout, s.Cin}).to(ct).contiguous(), bp = b_pw.to(ct).contiguous();
  Tensor g = gamma.to(ct), be = beta.to(ct);
  const TilePlan plan = plan_tiles(s.N, s.H, s.W, s.Cin + Cout, sizeof(T));
  const bool nhwc = plan.whole || cl;  // z's layout: pixels x channels, else NCHW
  // z, then y in the compute type: y itself when nothing is left to convert.  Half types keep z in
  // float until it is normalised: rounding z first would cost digits whenever a channel's std is
  // small next to its mean.
  const bool in_place = std::is_same<scalar_t, T>::value && nhwc == cl;
  Tensor zbuf = in_place ? output_empty({s.N, Cout, s.H, s.W}, x.options(), output_format(x))
                         : (nhwc ? output_empty({s.N, s.H, s.W, Cout}, X.options())
                                 : output_empty({s.N, Cout, s.H, s.W}, X.options()));
  T* zp = zbuf.data_ptr<T>();
  auto finish = [&]() -> Tensor {
    if (in_place) return zbuf;
    return nhwc ? from_nhwc(zbuf, x) : zbuf.to(x.scalar_type());
  };

  if (!training) {
    // BatchNorm and the pointwise bias folded into a per-channel scale and shift: one loop, not a
    // chain of ATen ops per call.
    const Tensor rm = running_mean.to(ct).contiguous(), rv = running_var.to(ct).contiguous();
    const Tensor gc = g.contiguous(), bc = be.contiguous();
    Tensor scale = at::empty({Cout}, rm.options()), shift = at::empty({Cout}, rm.options());
    T *sp = scale.data_ptr<T>(), *hp = shift.data_ptr<T>();
    const T *gp = gc.data_ptr<T>(), *bep = bc.data_ptr<T>(), *bpp = bp.data_ptr<T>(), *mp = rm.data_ptr<T>(),
            *vp = rv.data_ptr<T>();
    for (int64_t o = 0; o < Cout; ++o) {
      sp[o] = gp[o] * (T(1) / std::sqrt(vp[o] + static_cast<T>(eps)));
      hp[o] = (bpp[o] - mp[o]) * sp[o] + bep[o];
    }
    const T *a = sp, *b = hp;
    pointwise_of_depthwise<T>(X.data_ptr<T>(), s, plan, cl, dw, Wp.data_ptr<T>(),
                              zp, [&](int64_t, T* p, int64_t ld, int64_t R, int64_t Cn, bool per_col) {
                                affine_act(p, ld, p, ld, R, Cn, a, b, per_col, relu);
                              });
    return {finish(), rm.clone(), rv.clone()};
  }

  // Pass 1: z (with its bias) and per-block moments.
  const int64_t blocks = plan.whole ? (s.N * HW + kChunk - 1) / kChunk : plan.count;
  BlockMoments moments(blocks, Cout);
  const T* bpp = bp.data_ptr<T>();
  pointwise_of_depthwise<T>(X.data_ptr<T>(), s, plan, cl, dw, Wp.data_ptr<T>(), zp,
                            [&](int64_t blk, T* p, int64_t ld, int64_t R, int64_t Cn, bool per_col) {
                              std::vector<T> mq(static_cast<size_t>(2 * Cout));
                              bias_moments(p, ld, R, Cn, bpp, per_col, mq.data(), mq.data() + Cout);
                              moments.set(blk, mq.data(), mq.data() + Cout, R * Cn / Cout);
                            });
  Tensor mean, var;
  std::tie(mean, var) = moments.merge();
  // float32 statistics (float64 for float64 inputs), as the reference returns them.
  Tensor mean_out = mean.to(ct), var_out = var.to(ct);

  // Pass 2: normalise, with exactly the statistics the backward will see.
  Tensor scale = (g * at::rsqrt(var_out + eps)).contiguous();
  Tensor shift = (be - mean_out * scale).contiguous();
  const T *a = scale.data_ptr<T>(), *b = shift.data_ptr<T>();
  if (nhwc) {
    for_each_chunk(s.N * HW, kChunk, [&](int64_t, int64_t p0, int64_t p1) {
      affine_act(zp + p0 * Cout, Cout, zp + p0 * Cout, Cout, p1 - p0, Cout, a, b, true, relu);
    });
  } else {
    at::parallel_for(0, s.N * Cout, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t o = q % Cout;
        affine_act(zp + q * HW, HW, zp + q * HW, HW, 1, HW, a + o, b + o, false, relu);
      }
    });
  }
  return {finish(), mean_out, var_out};
}

template <typename scalar_t>
std::vector<Tensor> backward_impl(const Tensor& grad_y, const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                  const Tensor& w_pw, const Tensor& b_pw, const Tensor& gamma, const Tensor& beta,
                                  const Tensor& mean, const Tensor& var, bool training, double eps, bool relu,
                                  const Shapes& s) {
  using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const auto ct = c10::CppTypeToScalarType<T>::value;
  const int64_t Cin = s.Cin, Cout = s.Cout, W = s.W, k = s.k, P = s.N * s.H * s.W;
  Tensor X = to_nhwc(x, ct, Slot::kInput), G = to_nhwc(grad_y, ct, Slot::kGrad);
  Tensor wd = taps_major(w_dw, ct, false), wdf = taps_major(w_dw, ct, true), bd = b_dw.to(ct).contiguous();
  Tensor Wp = w_pw.reshape({Cout, Cin}).to(ct).contiguous(), bp = b_pw.to(ct).contiguous();
  Tensor invstd = at::rsqrt(var.to(ct) + eps).contiguous();
  Tensor gm = gamma.to(ct).contiguous(), bt = beta.to(ct).contiguous(), mu = mean.to(ct).contiguous();
  Tensor shift = (bp - mu).contiguous(), sc = (gm * invstd).contiguous();
  const T *Xp = X.data_ptr<T>(), *Gp = G.data_ptr<T>(), *Wpp = Wp.data_ptr<T>();

  // D, the depthwise output, recomputed; Z = D @ Wp^T is z minus its bias.
  Tensor D = scratch(Slot::kDepthwise, {s.N, s.H, W, Cin}, ct), Z = scratch(Slot::kPointwise, {s.N, s.H, W, Cout}, ct);
  T *Dp = D.data_ptr<T>(), *Zp = Z.data_ptr<T>();
  const T* wdp = wd.data_ptr<T>();
  const T* bdp = bd.data_ptr<T>();

  // BatchNorm + ReLU backward over pixels [p0, p1), in kChunk blocks (the float partial sums stay
  // short).  Training first needs the batch means of g and g * xhat (a pass with write = false);
  // the writing pass overwrites Z with dz.  Sums: g, g * xhat, dz (eval: the pointwise bias's gradient).
  BnActBackwardCoef<T> coef{shift.data_ptr<T>(), invstd.data_ptr<T>(), gm.data_ptr<T>(), bt.data_ptr<T>(),
                            sc.data_ptr<T>(), nullptr, nullptr};
  auto bn_rows = [&](int64_t p0, int64_t p1, bool write, double* sums) {
    std::vector<T> acc(static_cast<size_t>(3 * Cout));
    for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
      std::fill(acc.begin(), acc.end(), T(0));
      bn_act_backward(Zp + c0 * Cout, Gp + c0 * Cout, std::min(p1, c0 + kChunk) - c0, Cout, coef, training, relu,
                      write, acc.data(), acc.data() + Cout, acc.data() + 2 * Cout);
      for (int64_t o = 0; o < 3 * Cout; ++o) sums[o] += acc[o];
    }
  };
  std::vector<T> mg(Cout, T(0)), mgx(Cout, T(0));
  auto set_means = [&](const Tensor& sA) {
    const double* sp = sA.data_ptr<double>();
    for (int64_t o = 0; o < Cout; ++o) {
      mg[o] = static_cast<T>(sp[o] / P);
      mgx[o] = static_cast<T>(sp[Cout + o] / P);
    }
    coef.mean_g = mg.data();
    coef.mean_gx = mgx.data();
  };

  // Then the pointwise backward: grad w_pw = dz^T @ D, and D <- dz @ Wp (the gradient of the
  // depthwise output).  Large maps go tile by tile (as the forward's plan), each thread running
  // single-threaded GEMMs on L2-resident rows into its own grad w_pw; small maps take
  // whole-batch GEMMs (a tile's GEMM would mostly re-pack the weight).
  const TilePlan plan = plan_tiles(s.N, s.H, W, Cin + Cout, sizeof(T));
  Tensor gwp, s2;
  if (plan.whole) {
    depthwise_all(Xp, s.N, s.H, W, Cin, wdp, bdp, k, 1, Dp);
    gemm<T>(false, Dp, Cin, true, Wpp, Cin, Zp, Cout, P, Cout, Cin, false);
    auto bn_pass = [&](bool write) {
      ThreadSums<double> sums(3 * Cout);
      for_each_chunk(P, kChunk, [&](int64_t, int64_t p0, int64_t p1) { bn_rows(p0, p1, write, sums.mine()); });
      return sums.total();
    };
    if (training) set_means(bn_pass(false));
    s2 = bn_pass(true);
    gwp = at::empty({Cout, Cin}, X.options());
    gemm<T>(true, Zp, Cout, false, Dp, Cin, gwp.data_ptr<T>(), Cin, Cout, Cin, P, false);
    gemm<T>(false, Zp, Cout, false, Wpp, Cin, Dp, Cin, P, Cin, Cout, false);
  } else {
    ThreadSums<T> gwp_part(Cout * Cin);
    ThreadSums<double> sums(3 * Cout);
    // fn(n, r0, r1, p0, p1): a tile's image, rows and pixel range in the NHWC buffers.
    auto for_tiles = [&](const auto& fn) {
      for_each_tile<T>(
          plan, s.H, 0,
          [&](int64_t, int64_t n, int64_t r0, int64_t r1, T*) { fn(n, r0, r1, (n * s.H + r0) * W, (n * s.H + r1) * W); },
          /*fixed_split=*/true);
    };
    auto finish_tile = [&](int64_t p0, int64_t p1) {
      bn_rows(p0, p1, true, sums.mine());
      gemm<T>(true, Zp + p0 * Cout, Cout, false, Dp + p0 * Cin, Cin, gwp_part.mine(), Cin, Cout, Cin, p1 - p0, true);
      gemm<T>(false, Zp + p0 * Cout, Cout, false, Wpp, Cin, Dp + p0 * Cin, Cin, p1 - p0, Cin, Cout, false);
    };
    ThreadSums<double> sA(3 * Cout);
    for_tiles([&](int64_t n, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
      depthwise_rows(Xp + n * s.H * W * Cin, s.H, W, Cin, r0, r1, wdp, bdp, k, 1, Dp + p0 * Cin);
      gemm<T>(false, Dp + p0 * Cin, Cin, true, Wpp, Cin, Zp + p0 * Cout, Cout, p1 - p0, Cout, Cin, false);
      if (training) {
        bn_rows(p0, p1, false, sA.mine());
      } else {
        finish_tile(p0, p1);  // eval needs no batch means: one pass
      }
    });
    if (training) {
      set_means(sA.total());
      for_tiles([&](int64_t, int64_t, int64_t, int64_t p0, int64_t p1) { finish_tile(p0, p1); });
    }
    s2 = sums.total();
    gwp = gwp_part.total().reshape({Cout, Cin});
  }

  // Depthwise backward, row by row: grad_x = D (*) flipped w_dw; grad_w_dw = D x X.
  Tensor GX = output_empty({s.N, s.H, W, Cin}, X.options());
  ThreadSums<T> gw(k * k * Cin), gb(Cin);
  const T* wdfp = wdf.data_ptr<T>();
  T* GXp = GX.data_ptr<T>();
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / s.H, h = r % s.H;
      const T* Dn = Dp + n * s.H * W * Cin;
      dw_row(Dn, s.H, W, Cin, h, wdfp, static_cast<const T*>(nullptr), k, 1, GXp + r * W * Cin, false);
      dw_wgrad_row(Dn + h * W * Cin, Xp + n * s.H * W * Cin, s.H, W, Cin, h, k, 1, gw.mine(),
                   training ? static_cast<T*>(nullptr) : gb.mine());
    }
  });

  auto dbl = at::TensorOptions().dtype(at::kDouble);
  Tensor g_gamma = s2.narrow(0, Cout, Cout).clone(), g_beta = s2.narrow(0, 0, Cout).clone();
  // In training the batch mean absorbs both biases: their gradients are exactly zero.
  Tensor g_bpw = training ? at::zeros({Cout}, dbl) : s2.narrow(0, 2 * Cout, Cout).clone();
  Tensor g_bdw = training ? at::zeros({Cin}, dbl) : gb.total();
  Tensor g_wdw = gw.total().reshape({k * k, Cin}).t().reshape({Cin, 1, k, k});
  return {from_nhwc(GX, x),
          g_wdw.to(w_dw.scalar_type()).contiguous(),
          g_bdw.to(b_dw.scalar_type()),
          gwp.reshape({Cout, Cin, 1, 1}).to(w_pw.scalar_type()),
          g_bpw.to(b_pw.scalar_type()),
          g_gamma.to(gamma.scalar_type()),
          g_beta.to(beta.scalar_type())};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> dwconv_bn_act_forward(const Tensor& x, const Tensor& w_dw, const Tensor& b_dw,
                                                          const Tensor& w_pw, const Tensor& b_pw,
                                                          const Tensor& gamma, const Tensor& beta,
                                                          const Tensor& running_mean, const Tensor& running_var,
                                                          bool training, double eps, bool relu) {
  Shapes s = check_common(kFwd, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, "running_mean",
                          "running_var");
  c10::NoGradGuard no_grad;
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_dwconv_bn_act_forward", [&] {
    out = forward_impl<scalar_t>(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, training, eps,
                                 relu, s);
  });
  return out;
}

std::vector<Tensor> dwconv_bn_act_backward(const Tensor& grad_y, const Tensor& x, const Tensor& w_dw,
                                           const Tensor& b_dw, const Tensor& w_pw, const Tensor& b_pw,
                                           const Tensor& gamma, const Tensor& beta, const Tensor& mean,
                                           const Tensor& var, bool training, double eps, bool relu) {
  Shapes s = check_common(kBwd, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, "mean", "var");
  check_shape(kBwd, "grad_y", grad_y, {s.N, s.Cout, s.H, s.W});
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpu_dwconv_bn_act_backward", [&] {
    out = backward_impl<scalar_t>(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, training, eps, relu,
                                  s);
  });
  return out;
}

}  // namespace cpu
}  // namespace dlkunet
