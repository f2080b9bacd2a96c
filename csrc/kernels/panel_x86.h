// The exact path at larger M on x86 (avx2 / avx512 gemm.cpp include this from their folders,
// so every copy is compiled with that folder's flags and has internal linkage).
//
// The per-row kernels of gemm.cpp decode every weight once per block of at most 8 activation
// rows, so at M = 128 each weight is decoded 16 times and the decode's instructions compete
// with the FMAs (~45% of the FMA peak). Here a panel of 16 weight rows is dequantized once for
// all M rows by the ISA's dequant kernel (the reference's exact float32 values, bit for bit),
// transposed block by block into k-major order ([kPanelK][16], L1-resident), and multiplied by
// a register-blocked FMA microkernel (the ISA's Micro<MR>: MR activation rows times the 16
// panel columns, every broadcast x[m, k] feeding 16 outputs). Same products as the reference
// (float32, FMA accumulation in another order): float32-accurate like the rest of the path.
// (A dot-product microkernel on the untransposed rows, MR x NR accumulators along k with the
// rows read from L2, measured no faster than the per-row kernels.)
#pragma once
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "kernels/common.h"

namespace lowbit {
namespace panel {
using namespace detail;

constexpr int64_t kPanelN = 16;   // weight rows per panel
constexpr int64_t kPanelK = 256;  // k per transposed block: 16 KiB of panel (L1)

// 8 x 8 floats: src rows i (8 consecutive k of weight row i, row stride lds) -> dst[j * ldd + i].
static inline __attribute__((always_inline)) void transpose8(const float* src, int64_t lds, float* dst,
                                                             int64_t ldd) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// rows[16][ldr] (columns [k0, k0 + kb)) -> panel[kb][16]; the last kb % 8 columns one by one.
static inline void pack_panel(const float* rows, int64_t ldr, int64_t k0, int64_t kb, float* panel) {
  int64_t k = 0;
  for (; k + 8 <= kb; k += 8) {
    transpose8(rows + k0 + k, ldr, panel + k * kPanelN, kPanelN);
    transpose8(rows + 8 * ldr + k0 + k, ldr, panel + k * kPanelN + 8, kPanelN);
  }
  for (; k < kb; ++k)
    for (int64_t i = 0; i < kPanelN; ++i) panel[k * kPanelN + i] = rows[i * ldr + k0 + k];
}

// Micro<rest>::run for the last rest (< kMR) activation rows.
template <int R, template <int> class Micro>
static inline void tail(int64_t rest, const float* x, int64_t ldx, const float* pan, int64_t kb, float* y,
                        int64_t ldy, int64_t nr, bool first) {
  if constexpr (R >= 1) {
    if (rest == R) Micro<R>::run(x, ldx, pan, kb, y, ldy, nr, first);
    else tail<R - 1, Micro>(rest, x, ldx, pan, kb, y, ldy, nr, first);
  }
}

// y[M, n0:n1] = x[M, K] @ W[n0:n1, K]^T with the weight dequantized panel by panel.
// Dequant(w, n0, n1, out, ldo): the ISA's dequant kernel. Micro<MR>::run(x, ldx, panel, kb, y,
// ldy, ncols, first): MR rows of x (columns [0, kb)) times the panel into y's first ncols
// columns (stored when first, else added).
template <int kMR, template <int> class Micro, class Dequant>
static void gemm(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
                 float* y, int64_t ldy, const Dequant& dequant) {
  const int64_t K = w.K;
  thread_local std::vector<float> rows;  // 16 dequantized rows (L2)
  rows.resize(size_t(kPanelN * K));
  alignas(64) float pan[kPanelK * kPanelN];
  for (int64_t n = n0; n < n1; n += kPanelN) {
    const int64_t nr = min64(kPanelN, n1 - n);
    dequant(w, n, n + nr, rows.data(), K);
    for (int64_t i = nr; i < kPanelN; ++i)  // rows past the tile: zeros (their outputs are not stored)
      std::memset(rows.data() + i * K, 0, size_t(K) * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
      const int64_t kb = min64(kPanelK, K - k0);
      pack_panel(rows.data(), K, k0, kb, pan);
      const bool first = k0 == 0;
      int64_t m = 0;
      for (; m + kMR <= M; m += kMR) Micro<kMR>::run(x + m * ldx + k0, ldx, pan, kb, y + m * ldy + n, ldy, nr, first);
      tail<kMR - 1, Micro>(M - m, x + m * ldx + k0, ldx, pan, kb, y + m * ldy + n, ldy, nr, first);
    }
  }
}

}  // namespace panel
}  // namespace lowbit
