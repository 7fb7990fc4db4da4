// The pointwise GEMM of a tile, float32, on AVX2: C (M x N) = A (M x K) * B with B packed once
// per operator call.
//
// The tiles' GEMMs are small (a few hundred pixels by 96-384 channels) and there are hundreds per
// model forward; through at::mm each call re-packs the weight and zeroes C before accumulating
// (MKL's sgemm_scopy / sgemm_mscale: 6% of a DLKUNet-S forward), and its kernel ran at 75-83
// GF/s per core on these shapes where this one runs at 95-98 (one core of a 2-core AMD EPYC,
// AVX2; 448 x 96 x 96 to 224 x 384 x 384).  The register block is 6 rows x 16 columns: 12 ymm
// accumulators, two B vectors and a broadcast A element; K is split into blocks whose B panel
// (K x 16 floats) stays in L1.  AVX-512 machines keep MKL (its AVX-512 kernel is twice as wide),
// other architectures too.
#include "common.h"

#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DLK_TILE_GEMM 1
#endif

namespace dlkunet {
namespace cpu {

namespace {
constexpr int64_t kPanel = 16;   // columns per packed panel: two ymm
constexpr int64_t kRows = 6;     // rows per register block
constexpr int64_t kDepth = 128;  // K per block: an 8 KiB panel slice, in L1; also the longest sum chain
// parallel_gemm's tasks: up to 198 rows by 8 panels (128 columns): A's slice (99 KiB), the panels'
// slices (64 KiB) and the C block (99 KiB) together stay in a 512 KiB L2.  Every row block reads
// the whole weight again, so blocks are as tall as that allows: at the deep levels (196 pixels,
// 1536 channels) the weight is most of the traffic.
constexpr int64_t kBlockRows = 198;
constexpr int64_t kGroupPanels = 8;

#if DLK_TILE_GEMM
#define DLK_INLINE inline __attribute__((always_inline))

// C rows [0, MR) x 16 columns = (C +) A (MR x kc, lda) * panel (kc x 16).
template <int MR, bool ACCUMULATE>
__attribute__((target("avx2,fma"))) DLK_INLINE void block(const float* A, int64_t lda, const float* panel,
                                                          float* C, int64_t ldc, int64_t kc) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    lo[i] = _mm256_setzero_ps();
    hi[i] = _mm256_setzero_ps();
  }
  // Unrolled four steps: the loop's own instructions then take a quarter of the issue slots they
  // took, 2-10% more GF/s on hot operands (paired runs, one core of the AVX2 EPYC).
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanel), b1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      lo[i] = _mm256_fmadd_ps(a, b0, lo[i]);
      hi[i] = _mm256_fmadd_ps(a, b1, hi[i]);
    }
  }
  // Each K block sums from zero and is then added to C: a chain of at most kDepth products per
  // output, not K (at K = 1536 one chain had 5x at::mm's error against float64).
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (ACCUMULATE) {
      lo[i] = _mm256_add_ps(lo[i], _mm256_loadu_ps(C + i * ldc));
      hi[i] = _mm256_add_ps(hi[i], _mm256_loadu_ps(C + i * ldc + 8));
    }
    _mm256_storeu_ps(C + i * ldc, lo[i]);
    _mm256_storeu_ps(C + i * ldc + 8, hi[i]);
  }
}

template <bool ACCUMULATE>
__attribute__((target("avx2,fma"))) void rows(const float* A, int64_t lda, const float* panel, float* C,
                                              int64_t ldc, int64_t M, int64_t kc) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) block<kRows, ACCUMULATE>(A + m * lda, lda, panel, C + m * ldc, ldc, kc);
  switch (M - m) {
    case 5: block<5, ACCUMULATE>(A + m * lda, lda, panel, C + m * ldc, ldc, kc); break;
    case 4: block<4, ACCUMULATE>(A + m * lda, lda, panel, C + m * ldc, ldc, kc); break;
    case 3: block<3, ACCUMULATE>(A + m * lda, lda, panel, C + m * ldc, ldc, kc); break;
    case 2: block<2, ACCUMULATE>(A + m * lda, lda, panel, C + m * ldc, ldc, kc); break;
    case 1: block<1, ACCUMULATE>(A + m * lda, lda, panel, C + m * ldc, ldc, kc); break;
    default: break;
  }
}
#endif

bool pick_tile_gemm() {
#if DLK_TILE_GEMM
  const char* env = std::getenv("DLKUNET_CPU_GEMM");  // "mkl": every tile through at::mm (tests, comparisons)
  if (env && std::string(env) == "mkl") return false;
  return std::string(blocked_isa()) == "avx2";
#else
  return false;
#endif
}
}  // namespace

bool tile_gemm_available() {
  static const bool available = pick_tile_gemm();
  return available;
}

PackedB::PackedB(const float* B, int64_t ld, bool transposed, int64_t n, int64_t k) : N(n), K(k) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  buffer = scratch(Slot::kPackedWeight, {panels * K * kPanel}, at::kFloat);
  data = buffer.data_ptr<float>();
  // Parallel over panels (inline when called inside a parallel region).  A weight (N x K) is
  // transposed in 16 x 16 blocks, so that both sides move whole cache lines: column by column it
  // took 3.6 ms for a 1536 x 1536 weight, a third of the GEMM it feeds.
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = data + p * K * kPanel;
      const int64_t cols = std::min(kPanel, N - p * kPanel);
      if (!transposed) {
        for (int64_t kk = 0; kk < K; ++kk) {
          std::memcpy(dst + kk * kPanel, B + kk * ld + p * kPanel, cols * sizeof(float));
          std::fill(dst + kk * kPanel + cols, dst + (kk + 1) * kPanel, 0.f);
        }
        continue;
      }
      if (cols < kPanel) std::fill(dst, dst + K * kPanel, 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += kPanel) {
        const int64_t k1 = std::min(K, k0 + kPanel);
        for (int64_t j = 0; j < cols; ++j) {
          const float* src = B + (p * kPanel + j) * ld;
          for (int64_t kk = k0; kk < k1; ++kk) dst[kk * kPanel + j] = src[kk];
        }
      }
    }
  });
}

namespace {
// C rows [0, M) x panels [p0, p1) = A * B: K blocks outermost, so that A's (M x kDepth) slice stays
// in cache across the panels and each C block is added to once per K block.
void panels_gemm(const float* A, int64_t lda, const PackedB& B, float* C, int64_t ldc, int64_t M, int64_t p0,
                 int64_t p1) {
#if DLK_TILE_GEMM
  const int64_t last = (B.N + kPanel - 1) / kPanel - 1, edge_cols = B.N - last * kPanel;
  const bool partial = p1 > last && edge_cols < kPanel;
  AlignedVector<float> edge(partial ? static_cast<size_t>(M * kPanel) : 0);  // the last panel's 16 columns
  for (int64_t k0 = 0; k0 < B.K; k0 += kDepth) {
    const int64_t kc = std::min(kDepth, B.K - k0);
    for (int64_t p = p0; p < p1; ++p) {
      const bool to_edge = partial && p == last;
      float* out = to_edge ? edge.data() : C + p * kPanel;
      const int64_t ld = to_edge ? kPanel : ldc;
      const float* panel = B.data + (p * B.K + k0) * kPanel;
      if (k0 == 0) rows<false>(A + k0, lda, panel, out, ld, M, kc);
      else rows<true>(A + k0, lda, panel, out, ld, M, kc);
    }
  }
  if (partial)
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(C + m * ldc + last * kPanel, edge.data() + m * kPanel, edge_cols * sizeof(float));
#else
  (void)A; (void)lda; (void)B; (void)C; (void)ldc; (void)M; (void)p0; (void)p1;
  TORCH_CHECK(false, "dlkunet cpu kernel: tile_gemm needs x86-64 (check tile_gemm_available() first)");
#endif
}
}  // namespace

void tile_gemm(const float* A, int64_t lda, const PackedB& B, float* C, int64_t ldc, int64_t M) {
  panels_gemm(A, lda, B, C, ldc, M, 0, (B.N + kPanel - 1) / kPanel);
}

void parallel_gemm(const float* A, int64_t lda, const PackedB& B, float* C, int64_t ldc, int64_t M) {
  const int64_t panels = (B.N + kPanel - 1) / kPanel;
  const int64_t row_blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t rows_per = (M + row_blocks - 1) / row_blocks;
  const int64_t block_rows = (rows_per + kRows - 1) / kRows * kRows;
  const int64_t groups = (panels + kGroupPanels - 1) / kGroupPanels;
  for_each_task(row_blocks * groups, [&](int64_t t) {
    const int64_t r0 = t / groups * block_rows, g0 = t % groups * kGroupPanels;
    if (r0 >= M) return;
    panels_gemm(A + r0 * lda, lda, B, C + r0 * ldc, ldc, std::min(block_rows, M - r0), g0,
                std::min(panels, g0 + kGroupPanels));
  });
}

}  // namespace cpu
}  // namespace dlkunet
