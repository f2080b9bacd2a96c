// AVX-512 matmul y[m, n] = sum_k W[n, k] * x[m, k] over one tile of rows [n0, n1).
//
// Blocking (outermost first):
//  - m blocks of MR activation rows (the tile's weights are re-read from L2 once per block);
//  - k blocks of at most kXBlockFloats / MR columns: the block's activations are packed once
//    into a stack buffer (L1-resident, zero-padded to a whole chunk, and for the 4-bit formats
//    de-interleaved, see below), then every weight row of the tile is dotted with it; partial
//    sums go to y (the first k block stores, later ones add);
//  - NR weight rows at a time: each chunk of 32 codes per row is decoded in registers into
//    fp32 weights and each weight vector feeds MR FMAs, one per activation row, into
//    independent accumulators that are reduced horizontally once per (m, n, k block).
//
// 4-bit decode: vpmovzxbd turns the chunk's 16 bytes into 16 dwords; vpermps with the group's
// table of the 16 possible weights (group_table, exact reference values) maps each dword's
// low nibble (the even codes) and, after ">> 4", its high nibble (the odd codes) to weights:
// 4 instructions per 32 weights. The packed activations match that order: per chunk,
// x[c], x[c+2], ..., x[c+30] then x[c+1], x[c+3], ..., x[c+31].
//
// Groups: a group [k0, k1) (clipped to the k block) covers the chunks from (k0 & ~31) to k1;
// a chunk not wholly inside it is "partial" and uses masked FMAs restricted to the group's
// lanes, so any group size (odd ones included) works, at full speed for multiples of 32.
#include "kernels/avx512/simd.h"

namespace lowbit {
namespace avx512 {
using namespace detail;

// Most activation rows per m block: 8 x 2 accumulators + tables, weights and x fit 32 zmm.
static constexpr int kMaxMR = 8;

// Floats of packed activations per m block (32 KiB): the k block is kXBlockFloats / MR
// columns rounded down to whole chunks (1024 for MR = 8, so a (m, n) pair is reduced once
// per 32 chunks at most).
static constexpr int64_t kXBlockFloats = 8192;

// Weight rows walked together for a block of MR activation rows (MR x NR accumulators <= 16).
static constexpr int nr_for(int mr) { return mr <= 4 ? 4 : 2; }

// Accumulator sets per (m, n): with few rows, even and odd codes accumulate separately so
// that each dependency chain gets one FMA per chunk (the FMA latency stays hidden).
static constexpr int sets_for(int mr, int nr) { return mr * nr <= 4 ? 2 : 1; }

// Lanes whose k offset in the chunk (2 * lane + odd) lies in [lo, hi).
static inline __mmask16 pair_mask(int odd, int64_t lo, int64_t hi) {
  const __m512i k = _mm512_add_epi32(
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
      _mm512_set1_epi32(odd));
  return _mm512_cmp_epi32_mask(k, _mm512_set1_epi32(int(lo)), _MM_CMPINT_NLT) &
         _mm512_cmp_epi32_mask(k, _mm512_set1_epi32(int(hi)), _MM_CMPINT_LT);
}

// One 4-bit chunk at k = c for all MR x NR pairs. xc: packed activations of the chunk (row
// stride ldxb). kPartial: only k offsets [lo, hi) of the chunk belong to the current group,
// and the chunk may run past the end of the row (its bytes are then loaded masked).
template <int MR, int NR, int S, bool kPartial>
static inline __attribute__((always_inline)) void chunk4(
    const uint8_t* const (&row)[NR], int64_t c, int64_t rb, const __m512 (&t)[NR],
    const float* xc, int64_t ldxb, int64_t lo, int64_t hi, __m512 (&acc)[S][MR][NR]) {
  __m512 wl[NR], wh[NR];
  for (int r = 0; r < NR; ++r) {
    const __m128i b = kPartial ? load_code_bytes(row[r], c, rb)
                               : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + (c >> 1)));
    const __m512i v = _mm512_cvtepu8_epi32(b);
    wl[r] = _mm512_permutexvar_ps(v, t[r]);  // index bits 0..3: the low nibble
    wh[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t[r]);
  }
  if (kPartial) {
    const __mmask16 ml = pair_mask(0, lo, hi), mh = pair_mask(1, lo, hi);
    for (int m = 0; m < MR; ++m) {
      const __m512 xl = _mm512_loadu_ps(xc + m * ldxb);
      const __m512 xh = _mm512_loadu_ps(xc + m * ldxb + 16);
      for (int r = 0; r < NR; ++r) {  // masked-off lanes keep the accumulator as it is
        acc[0][m][r] = _mm512_mask3_fmadd_ps(wl[r], xl, acc[0][m][r], ml);
        acc[S - 1][m][r] = _mm512_mask3_fmadd_ps(wh[r], xh, acc[S - 1][m][r], mh);
      }
    }
  } else {
    for (int m = 0; m < MR; ++m) {
      const __m512 xl = _mm512_loadu_ps(xc + m * ldxb);
      const __m512 xh = _mm512_loadu_ps(xc + m * ldxb + 16);
      for (int r = 0; r < NR; ++r) {
        acc[0][m][r] = _mm512_fmadd_ps(wl[r], xl, acc[0][m][r]);
        acc[S - 1][m][r] = _mm512_fmadd_ps(wh[r], xh, acc[S - 1][m][r]);
      }
    }
  }
}

// One int8 chunk (32 codes at k = c). kPartial: the chunk runs past K; codes are loaded
// masked (the packed activations are zero there).
template <int MR, int NR, int S, bool kPartial>
static inline __attribute__((always_inline)) void chunk8(const uint8_t* const (&row)[NR],
                                                         int64_t c, int64_t K, const float* xc,
                                                         int64_t ldxb, __m512 (&acc)[S][MR][NR]) {
  for (int j = 0; j < 2; ++j) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* p = row[r] + c + 16 * j;
      const __m128i b = kPartial ? _mm_maskz_loadu_epi8(first_lanes16(K - c - 16 * j), p)
                                 : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(xc + m * ldxb + 16 * j);
      for (int r = 0; r < NR; ++r) acc[j % S][m][r] = _mm512_fmadd_ps(wv[r], xv, acc[j % S][m][r]);
    }
  }
}

// 16 int8 codes at k (inside one group) of grouped int8: weights decoded as the reference's
// float(q - z) * s (s, z: the group's broadcast scale and zero-point), then one FMA per
// activation row. kPartial: the segment runs past K (codes loaded masked; x is zero there).
// J picks the accumulator set (segments alternate between the S sets).
template <int MR, int NR, int S, int J, bool kPartial>
static inline __attribute__((always_inline)) void seg16g(const uint8_t* const (&row)[NR], int64_t k,
                                                         int64_t K, const __m512 (&s)[NR],
                                                         const __m512 (&z)[NR], const float* xc,
                                                         int64_t ldxb, __m512 (&acc)[S][MR][NR]) {
  __m512 wv[NR];
  for (int r = 0; r < NR; ++r) {
    const __m128i b = kPartial ? _mm_maskz_loadu_epi8(first_lanes16(K - k), row[r] + k)
                               : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k));
    wv[r] = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), z[r]), s[r]);
  }
  for (int m = 0; m < MR; ++m) {
    const __m512 xv = _mm512_loadu_ps(xc + m * ldxb);
    for (int r = 0; r < NR; ++r) acc[J % S][m][r] = _mm512_fmadd_ps(wv[r], xv, acc[J % S][m][r]);
  }
}

// Any group size: walks group by group; chunks off the grid of 32 at either end of a group are
// partial (masked). Kept out of line so that the common case (gemm_block) keeps its
// accumulators in registers.
template <int F, int MR, int NR, int S>
__attribute__((noinline)) static void walk_any_groups(const QWeight& w, const uint8_t* const (&row)[NR],
                                                      int64_t n, const float* xb, int64_t ldxb,
                                                      int64_t kb0, int64_t kb1,
                                                      __m512 (&acc)[S][MR][NR]) {
  const int64_t gs = w.group;
  const int64_t rb = (w.K + 1) / 2;  // code bytes per row: never read at or past rb
  for (int64_t g = kb0 / gs; g * gs < kb1; ++g) {
    const int64_t k0 = g * gs > kb0 ? g * gs : kb0;
    const int64_t k1 = min64(g * gs + gs, kb1);
    __m512 t[NR];
    for (int r = 0; r < NR; ++r) t[r] = group_table<F>(w, n + r, g);
    int64_t c = k0 & ~(kChunk - 1);
    if (c < k0) {
      chunk4<MR, NR, S, true>(row, c, rb, t, xb + (c - kb0), ldxb, k0 - c, min64(k1 - c, kChunk), acc);
      c += kChunk;
    }
    for (; c + kChunk <= k1; c += kChunk) {
      prefetch_rows<NR>(row, c >> 1, NR * w.ld_data);
      chunk4<MR, NR, S, false>(row, c, rb, t, xb + (c - kb0), ldxb, 0, kChunk, acc);
    }
    if (c < k1) chunk4<MR, NR, S, true>(row, c, rb, t, xb + (c - kb0), ldxb, 0, k1 - c, acc);
  }
}

// Rows n .. n+NR-1 against the packed block (columns [kb0, kb1) of MR activation rows).
template <int F, int MR, int NR>
__attribute__((noinline)) static void gemm_block(const QWeight& w, const float* xb, int64_t ldxb,
                                                 int64_t kb0, int64_t kb1, int64_t n, float* y,
                                                 int64_t ldy, bool first) {
  constexpr int S = sets_for(MR, NR);
  const int64_t K = w.K, ahead = NR * w.ld_data;
  const uint8_t* row[NR];
  for (int r = 0; r < NR; ++r) row[r] = w.data + (n + r) * w.ld_data;
  __m512 acc[S][MR][NR];
  for (int s = 0; s < S; ++s)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[s][m][r] = _mm512_setzero_ps();

  // Chunks wholly inside the block and the row; only the row's last chunk may be partial.
  const int64_t kfull = kb0 + ((kb1 - kb0) & ~(kChunk - 1));
  if constexpr (F == kInt8) {
    for (int64_t c = kb0; c < kfull; c += kChunk) {
      prefetch_rows<NR>(row, c, ahead);
      chunk8<MR, NR, S, false>(row, c, K, xb + (c - kb0), ldxb, acc);
    }
    if (kfull < kb1) chunk8<MR, NR, S, true>(row, kfull, K, xb + (kfull - kb0), ldxb, acc);
  } else if constexpr (F == kKindInt8Grouped) {
    // groups are multiples of 16 (or the row) and kb0 is on the grid of 32: every 16-column
    // segment lies in one group; only the row's last may run past K
    const int64_t gs = w.group;
    for (int64_t g = kb0 / gs; g * gs < kb1; ++g) {
      const int64_t k0 = g * gs > kb0 ? g * gs : kb0, k1 = min64(g * gs + gs, kb1);
      __m512 s[NR], z[NR];
      for (int r = 0; r < NR; ++r) {
        s[r] = _mm512_set1_ps(group_scale(w, n + r, g));
        z[r] = _mm512_set1_ps(float(group_zero(w, n + r, g)));
      }
      int64_t k = k0;
      for (; k + 32 <= k1; k += 32) {
        prefetch_rows<NR>(row, k, ahead);
        seg16g<MR, NR, S, 0, false>(row, k, K, s, z, xb + (k - kb0), ldxb, acc);
        seg16g<MR, NR, S, 1, false>(row, k + 16, K, s, z, xb + (k + 16 - kb0), ldxb, acc);
      }
      if (k + 16 <= k1) {
        seg16g<MR, NR, S, 0, false>(row, k, K, s, z, xb + (k - kb0), ldxb, acc);
        k += 16;
      }
      if (k < k1) seg16g<MR, NR, S, 1, true>(row, k, K, s, z, xb + (k - kb0), ldxb, acc);
    }
  } else if (w.group % kChunk == 0) {
    // Every group boundary is on the chunk grid: all chunks but the row's last are full.
    const int64_t gs = w.group;
    for (int64_t g = kb0 / gs; g * gs < kfull; ++g) {
      const int64_t c0 = g * gs > kb0 ? g * gs : kb0, c1 = min64(g * gs + gs, kfull);
      __m512 t[NR];
      for (int r = 0; r < NR; ++r) t[r] = group_table<F>(w, n + r, g);
      for (int64_t c = c0; c < c1; c += kChunk) {
        prefetch_rows<NR>(row, c >> 1, ahead);
        chunk4<MR, NR, S, false>(row, c, 0, t, xb + (c - kb0), ldxb, 0, kChunk, acc);
      }
    }
    if (kfull < kb1) {
      __m512 t[NR];
      for (int r = 0; r < NR; ++r) t[r] = group_table<F>(w, n + r, kfull / gs);
      chunk4<MR, NR, S, true>(row, kfull, (K + 1) / 2, t, xb + (kfull - kb0), ldxb, 0, kb1 - kfull, acc);
    }
  } else {
    walk_any_groups<F, MR, NR, S>(w, row, n, xb, ldxb, kb0, kb1, acc);
  }

  for (int r = 0; r < NR; ++r) {
    const float s = F == kInt8 ? static_cast<const float*>(w.scales)[n + r] : 1.0f;
    for (int m = 0; m < MR; ++m) {
      __m512 a = acc[0][m][r];
      if (S == 2) a = _mm512_add_ps(a, acc[S - 1][m][r]);
      float v = _mm512_reduce_add_ps(a);
      if (F == kInt8) v *= s;
      float* o = y + m * ldy + n + r;
      *o = first ? v : *o + v;
    }
  }
}

// Packs columns [k0, k1) of mr rows of x into xb (row stride ldxb), zero-padded to a whole
// chunk; 4-bit formats get each chunk's even columns first, then its odd ones.
template <int F>
static void pack_x(const float* x, int64_t ldx, int64_t mr, int64_t k0, int64_t k1, float* xb,
                   int64_t ldxb) {
  const int64_t len = k1 - k0;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < mr; ++m) {
    const float* s = x + m * ldx + k0;
    float* d = xb + m * ldxb;
    for (int64_t c = 0; c < len; c += kChunk) {
      // masked loads: the last chunk may run past the row (zeros there, nothing read)
      const __m512 a0 = _mm512_maskz_loadu_ps(first_lanes16(len - c), s + c);
      const __m512 a1 = _mm512_maskz_loadu_ps(first_lanes16(len - c - 16), s + c + 16);
      if constexpr (F == kInt8 || F == kKindInt8Grouped) {
        _mm512_storeu_ps(d + c, a0);
        _mm512_storeu_ps(d + c + 16, a1);
      } else {
        _mm512_storeu_ps(d + c, _mm512_permutex2var_ps(a0, even, a1));
        _mm512_storeu_ps(d + c + 16, _mm512_permutex2var_ps(a0, odd, a1));
      }
    }
  }
}

template <int F, int MR>
static void gemm_mblock(const QWeight& w, const float* x, int64_t ldx, int64_t n0, int64_t n1,
                        float* y, int64_t ldy) {
  constexpr int NR = nr_for(MR);
  constexpr int64_t kb = kXBlockFloats / MR / kChunk * kChunk;  // k block (whole chunks)
  alignas(64) float xb[kXBlockFloats];
  for (int64_t k0 = 0; k0 < w.K; k0 += kb) {
    const int64_t k1 = min64(w.K, k0 + kb);
    pack_x<F>(x, ldx, MR, k0, k1, xb, kb);
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) gemm_block<F, MR, NR>(w, xb, kb, k0, k1, n, y, ldy, k0 == 0);
    for (; n < n1; ++n) gemm_block<F, MR, 1>(w, xb, kb, k0, k1, n, y, ldy, k0 == 0);
  }
}

template <int F>
static void gemm_fmt(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0,
                     int64_t n1, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
    const float* xm = x + m0 * ldx;
    float* ym = y + m0 * ldy;
    switch (min64(kMaxMR, M - m0)) {
      case 1: gemm_mblock<F, 1>(w, xm, ldx, n0, n1, ym, ldy); break;
      case 2: gemm_mblock<F, 2>(w, xm, ldx, n0, n1, ym, ldy); break;
      case 3: gemm_mblock<F, 3>(w, xm, ldx, n0, n1, ym, ldy); break;
      case 4: gemm_mblock<F, 4>(w, xm, ldx, n0, n1, ym, ldy); break;
      case 5: gemm_mblock<F, 5>(w, xm, ldx, n0, n1, ym, ldy); break;
      case 6: gemm_mblock<F, 6>(w, xm, ldx, n0, n1, ym, ldy); break;
      case 7: gemm_mblock<F, 7>(w, xm, ldx, n0, n1, ym, ldy); break;
      default: gemm_mblock<F, 8>(w, xm, ldx, n0, n1, ym, ldy); break;
    }
  }
}

void gemm_int8(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  if (int8_per_row(w)) gemm_fmt<kInt8>(w, x, M, ldx, n0, n1, y, ldy);
  else gemm_fmt<kKindInt8Grouped>(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_int4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  if (w.float_offset) gemm_fmt<kKindInt4Offset>(w, x, M, ldx, n0, n1, y, ldy);
  else gemm_fmt<kInt4>(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_fp4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  gemm_fmt<kFP4>(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_nf4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  gemm_fmt<kNF4>(w, x, M, ldx, n0, n1, y, ldy);
}

}  // namespace avx512
}  // namespace lowbit
