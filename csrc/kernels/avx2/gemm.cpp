// AVX2 + FMA matmul y[m, n] = sum_k W[n, k] * x[m, k] over one tile of rows [n0, n1).
//
// Blocking (outermost first):
//  - m blocks of MR activation rows (the tile's weights are re-read from L2 once per block);
//  - k blocks of at most kXBlockFloats / MR columns: the block's activations are packed once
//    into a small stack buffer (L1-resident, zero-padded to a whole chunk, and for the 4-bit
//    formats de-interleaved, see below), then every weight row of the tile is dotted with it;
//    partial sums go to y (the first k block stores, later ones add);
//  - NR weight rows at a time: each chunk of 32 codes per row is decoded in registers into
//    fp32 weights and each weight vector feeds MR FMAs, one per activation row, into
//    independent accumulators that are reduced horizontally once per (m, n, k block).
//
// De-interleaving: the 16 bytes of a 4-bit chunk hold code 2i in the low and code 2i+1 in the
// high nibble of byte i. vpmovzxbd turns 8 bytes into 8 dwords at once; "& 15" gives the even
// codes and ">> 4" the odd ones, with no byte shuffles. The packed activations are laid out
// to match: per chunk, x[c], x[c+2], ..., x[c+30] then x[c+1], x[c+3], ..., x[c+31].
//
// Groups: a chunk lies on the global grid of multiples of 32. A group [k0, k1) (clipped to the
// k block) covers the chunks from (k0 & ~31) to k1; a chunk not wholly inside it is "partial"
// and both its weights and its activations are masked to the group's lanes, so any group size
// (odd ones included) works, at full speed when the group size is a multiple of 32.
//
// Weights are the reference's exact values (int4: float(q - z) * s; nf4: codebook[q] * absmax),
// so e.g. a code equal to its zero-point contributes exactly nothing.
#include "kernels/avx2/simd.h"
#include "kernels/avx2/table_functions.h"
#include "kernels/panel_x86.h"

namespace lowbit {
namespace avx2 {
using namespace detail;

// Most activation rows per m block: each decoded weight vector feeds up to 8 FMAs (8 x 1
// accumulators + 2 weights + 1 x vector fit the 16 ymm registers).
static constexpr int kMaxMR = 8;

// Floats of packed activations per m block (16 KiB, comfortably inside L1 with the weights
// streaming past); the k block is kXBlockFloats / MR columns, rounded down to whole chunks.
static constexpr int64_t kXBlockFloats = 4096;

// Weight rows walked together for a block of MR activation rows, and accumulator sets per
// (m, n) (2: even and odd codes accumulate separately, halving each FMA dependency chain).
// Chosen so that the accumulators never spill (16 ymm: MR * NR * S accumulators, the per-row
// group parameters, the decoded weights and x) while keeping at least ~4 cycles of other work
// between two FMAs of one chain: M = 1 walks 4 rows (4 chains, each waiting on 8 decodes).
static constexpr int nr_for(int mr) { return mr == 1 ? 4 : mr == 2 ? 2 : 1; }
static constexpr int sets_for(int mr, int nr) { return mr >= 2 && mr <= 5 ? 2 : 1; }

// Per-row parameters of one group, prepared once per group.
//  int4 and grouped int8: a = scale, b = the zero-point as float (weight = (q - b) * a, exact
//        like the reference);
//  int4 with float offsets: a = scale, b = offset (weight = q * a + b, multiply then add);
//  nf4 / fp4: a = codebook[0..7] * absmax, b = codebook[8..15] * absmax (lookup tables).
struct GemmParams {
  __m256 a, b;
};

template <int F>
static inline GemmParams gemm_params(const QWeight& w, int64_t n, int64_t g) {
  GemmParams p;
  if constexpr (F == kInt4 || F == kKindInt8Grouped) {
    p.a = _mm256_set1_ps(group_scale(w, n, g));
    p.b = _mm256_set1_ps(float(group_zero(w, n, g)));
  } else {
    const GroupParams q = group_params<F>(w, n, g);
    p.a = q.a;
    p.b = q.b;
  }
  return p;
}

// 8 dwords holding one code byte each -> weights of the low (even k) and high (odd k) nibbles.
template <int F>
static inline void decode_pair(__m256i v, const GemmParams& p, __m256& wl, __m256& wh) {
  if constexpr (F == kInt4) {
    const __m256 ql = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0f)));
    const __m256 qh = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    wl = _mm256_mul_ps(_mm256_sub_ps(ql, p.b), p.a);  // q - z is exact in float
    wh = _mm256_mul_ps(_mm256_sub_ps(qh, p.b), p.a);
  } else if constexpr (F == kKindInt4Offset) {
    const __m256 ql = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0f)));
    const __m256 qh = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    wl = _mm256_add_ps(_mm256_mul_ps(ql, p.a), p.b);  // the reference's q * s + m
    wh = _mm256_add_ps(_mm256_mul_ps(qh, p.a), p.b);
  } else {
    // vpermps reads index bits 0..2; bit 3 of the code picks the table (as the sign bit).
    const __m256i vh = _mm256_srli_epi32(v, 4);
    wl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(p.a, v), _mm256_permutevar8x32_ps(p.b, v),
                          _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
    wh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(p.a, vh), _mm256_permutevar8x32_ps(p.b, vh),
                          _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
  }
}

// Mask of the lanes whose k offset in the chunk (base + 2 * lane) lies in [lo, hi).
static inline __m256 pair_mask(int base, int64_t lo, int64_t hi) {
  const __m256i k = _mm256_setr_epi32(base, base + 2, base + 4, base + 6, base + 8, base + 10,
                                      base + 12, base + 14);
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(k, _mm256_set1_epi32(int(lo) - 1)),
                                              _mm256_cmpgt_epi32(_mm256_set1_epi32(int(hi)), k)));
}

// One 4-bit chunk at k = c for all MR x NR pairs. xc: packed activations of the chunk (row
// stride ldxb). kPartial: only k offsets [lo, hi) of the chunk belong to the current group,
// and the chunk may run past the end of the row (then its bytes are copied).
template <int F, int MR, int NR, int S, bool kPartial>
static inline __attribute__((always_inline)) void chunk4(
    const uint8_t* const (&row)[NR], int64_t c, int64_t rb, const GemmParams (&p)[NR],
    const float* xc, int64_t ldxb, int64_t lo, int64_t hi, __m256 (&acc)[S][MR][NR]) {
  __m128i b[NR];
  if (kPartial)
    for (int r = 0; r < NR; ++r) b[r] = load_code_bytes(row[r], c, rb);
  for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h+7: codes c+16h .. c+16h+15
    __m256 wl[NR], wh[NR];
    for (int r = 0; r < NR; ++r) {
      __m256i v;
      if (kPartial)
        v = _mm256_cvtepu8_epi32(h == 0 ? b[r] : _mm_unpackhi_epi64(b[r], b[r]));
      else
        v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row[r] + (c >> 1) + 8 * h)));
      decode_pair<F>(v, p[r], wl[r], wh[r]);
    }
    __m256 ml = _mm256_setzero_ps(), mh = _mm256_setzero_ps();
    if (kPartial) {
      ml = pair_mask(16 * h, lo, hi);
      mh = pair_mask(16 * h + 1, lo, hi);
      for (int r = 0; r < NR; ++r) {
        wl[r] = _mm256_and_ps(wl[r], ml);
        wh[r] = _mm256_and_ps(wh[r], mh);
      }
    }
    for (int m = 0; m < MR; ++m) {
      __m256 xl = _mm256_loadu_ps(xc + m * ldxb + 8 * h);
      __m256 xh = _mm256_loadu_ps(xc + m * ldxb + 16 + 8 * h);
      if (kPartial) {  // lanes of other groups may hold inf/nan: keep 0 * x out of the sum
        xl = _mm256_and_ps(xl, ml);
        xh = _mm256_and_ps(xh, mh);
      }
      for (int r = 0; r < NR; ++r) {
        acc[0][m][r] = _mm256_fmadd_ps(wl[r], xl, acc[0][m][r]);
        acc[S - 1][m][r] = _mm256_fmadd_ps(wh[r], xh, acc[S - 1][m][r]);
      }
    }
  }
}

// M = 1, int4: one full chunk at k = c into per-group accumulators of sum(q * x) over the
// codes q themselves (no zero-point subtraction, no scale multiply: those come once per group,
// see gemm_block), and xs += x (the group's sum of activations, shared by the rows).
template <int NR>
static inline __attribute__((always_inline)) void chunk4_codes(const uint8_t* const (&row)[NR], int64_t c,
                                                               const float* xc, __m256 (&gacc)[NR],
                                                               __m256& xs) {
  const __m256i m15 = _mm256_set1_epi32(0x0f);
  for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h+7: codes c+16h .. c+16h+15
    const __m256 xl = _mm256_loadu_ps(xc + 8 * h);
    const __m256 xh = _mm256_loadu_ps(xc + 16 + 8 * h);
    xs = _mm256_add_ps(xs, _mm256_add_ps(xl, xh));
    for (int r = 0; r < NR; ++r) {
      const __m256i v =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row[r] + (c >> 1) + 8 * h)));
      gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m15)), xl, gacc[r]);
      gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xh, gacc[r]);
    }
  }
}

// One int8 chunk (32 codes at k = c). kPartial: the chunk runs past K; its codes are copied
// (the packed activations are zero there).
template <int MR, int NR, int S, bool kPartial>
static inline __attribute__((always_inline)) void chunk8(const uint8_t* const (&row)[NR],
                                                         int64_t c, int64_t K, const float* xc,
                                                         int64_t ldxb, __m256 (&acc)[S][MR][NR]) {
  alignas(32) int8_t buf[NR][32];
  if (kPartial) {
    for (int r = 0; r < NR; ++r) {
      std::memset(buf[r], 0, 32);
      std::memcpy(buf[r], row[r] + c, size_t(K - c));
    }
  }
  for (int j = 0; j < 4; ++j) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) {
      const void* src = kPartial ? static_cast<const void*>(buf[r] + 8 * j)
                                 : static_cast<const void*>(row[r] + c + 8 * j);
      wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(src))));
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(xc + m * ldxb + 8 * j);
      for (int r = 0; r < NR; ++r) acc[j % S][m][r] = _mm256_fmadd_ps(wv[r], xv, acc[j % S][m][r]);
    }
  }
}

// 16 int8 codes at k (inside one group) of grouped int8: weights decoded as the reference's
// float(q - z) * s, then one FMA per activation row. kPartial: the segment runs past K; its
// codes are copied (the packed activations are zero there).
template <int MR, int NR, int S, bool kPartial>
static inline __attribute__((always_inline)) void seg8g(const uint8_t* const (&row)[NR], int64_t k,
                                                        int64_t K, const GemmParams (&p)[NR],
                                                        const float* xc, int64_t ldxb,
                                                        __m256 (&acc)[S][MR][NR]) {
  alignas(16) int8_t buf[NR][16];
  if (kPartial) {
    for (int r = 0; r < NR; ++r) {
      std::memset(buf[r], 0, 16);
      std::memcpy(buf[r], row[r] + k, size_t(K - k));
    }
  }
  for (int j = 0; j < 2; ++j) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) {
      const void* src = kPartial ? static_cast<const void*>(buf[r] + 8 * j)
                                 : static_cast<const void*>(row[r] + k + 8 * j);
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(src))));
      wv[r] = _mm256_mul_ps(_mm256_sub_ps(q, p[r].b), p[r].a);
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(xc + m * ldxb + 8 * j);
      for (int r = 0; r < NR; ++r) acc[j % S][m][r] = _mm256_fmadd_ps(wv[r], xv, acc[j % S][m][r]);
    }
  }
}

// Any group size: walks group by group; chunks off the grid of 32 at either end of a group are
// partial (masked). Kept out of line so that the common case (gemm_block) keeps its
// accumulators in registers.
template <int F, int MR, int NR, int S>
__attribute__((noinline)) static void walk_any_groups(const QWeight& w, const uint8_t* const (&row)[NR],
                                                      int64_t n, const float* xb, int64_t ldxb,
                                                      int64_t kb0, int64_t kb1,
                                                      __m256 (&acc)[S][MR][NR]) {
  const int64_t gs = w.group;
  const int64_t rb = (w.K + 1) / 2;  // code bytes per row: never read at or past rb
  for (int64_t g = kb0 / gs; g * gs < kb1; ++g) {
    const int64_t k0 = g * gs > kb0 ? g * gs : kb0;
    const int64_t k1 = min64(g * gs + gs, kb1);
    GemmParams p[NR];
    for (int r = 0; r < NR; ++r) p[r] = gemm_params<F>(w, n + r, g);
    int64_t c = k0 & ~(kChunk - 1);
    if (c < k0) {
      chunk4<F, MR, NR, S, true>(row, c, rb, p, xb + (c - kb0), ldxb, k0 - c, min64(k1 - c, kChunk), acc);
      c += kChunk;
    }
    for (; c + kChunk <= k1; c += kChunk) {
      prefetch_rows<NR>(row, c >> 1, NR * w.ld_data);
      chunk4<F, MR, NR, S, false>(row, c, rb, p, xb + (c - kb0), ldxb, 0, kChunk, acc);
    }
    if (c < k1) chunk4<F, MR, NR, S, true>(row, c, rb, p, xb + (c - kb0), ldxb, 0, k1 - c, acc);
  }
}

// Rows n .. n+NR-1 against the packed block (columns [kb0, kb1) of MR activation rows).
// ``factored`` (int4, M = 1, a row factor_ok accepted): full chunks accumulate sum(q * x) per
// group (chunk4_codes) and each group adds s * (that - z * sum(x)): 7 instructions per 16
// weights instead of 11 (the decode's zero-point subtraction and scale multiply go), the same
// products summed in another order (float32-accurate like the rest of the exact path).
template <int F, int MR, int NR>
__attribute__((noinline)) static void gemm_block(const QWeight& w, const float* xb, int64_t ldxb,
                                                 int64_t kb0, int64_t kb1, int64_t n, float* y,
                                                 int64_t ldy, bool first, bool factored = false) {
  constexpr int S = sets_for(MR, NR);
  float corr[NR] = {};  // factored: sum over groups of s * z * sum(x), subtracted at the end
  const int64_t K = w.K, ahead = NR * w.ld_data;
  const uint8_t* row[NR];
  for (int r = 0; r < NR; ++r) row[r] = w.data + (n + r) * w.ld_data;
  __m256 acc[S][MR][NR];
  for (int s = 0; s < S; ++s)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[s][m][r] = _mm256_setzero_ps();

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
      GemmParams p[NR];
      for (int r = 0; r < NR; ++r) p[r] = gemm_params<F>(w, n + r, g);
      int64_t k = k0;
      for (; k + 16 <= k1; k += 16) {
        if ((k & 63) == 0) prefetch_rows<NR>(row, k, ahead);
        seg8g<MR, NR, S, false>(row, k, K, p, xb + (k - kb0), ldxb, acc);
      }
      if (k < k1) seg8g<MR, NR, S, true>(row, k, K, p, xb + (k - kb0), ldxb, acc);
    }
  } else if (F == kInt4 && MR == 1 && factored && w.group % kChunk == 0) {
    const int64_t gs = w.group;
    for (int64_t g = kb0 / gs; g * gs < kfull; ++g) {
      const int64_t c0 = g * gs > kb0 ? g * gs : kb0, c1 = min64(g * gs + gs, kfull);
      __m256 gacc[NR], xs = _mm256_setzero_ps();
      for (int r = 0; r < NR; ++r) gacc[r] = _mm256_setzero_ps();
      for (int64_t c = c0; c < c1; c += kChunk) {
        prefetch_rows<NR>(row, c >> 1, ahead);
        chunk4_codes<NR>(row, c, xb + (c - kb0), gacc, xs);
      }
      const float xsum = hsum(xs);
      for (int r = 0; r < NR; ++r) {
        const float sc = group_scale(w, n + r, g);
        acc[0][0][r] = _mm256_fmadd_ps(gacc[r], _mm256_set1_ps(sc), acc[0][0][r]);
        corr[r] += sc * float(group_zero(w, n + r, g)) * xsum;
      }
    }
    if (kfull < kb1) {
      GemmParams p[NR];
      for (int r = 0; r < NR; ++r) p[r] = gemm_params<F>(w, n + r, kfull / gs);
      chunk4<F, MR, NR, S, true>(row, kfull, (K + 1) / 2, p, xb + (kfull - kb0), ldxb, 0, kb1 - kfull, acc);
    }
  } else if (w.group % kChunk == 0) {
    // Every group boundary is on the chunk grid: all chunks but the row's last are full.
    const int64_t gs = w.group;
    for (int64_t g = kb0 / gs; g * gs < kfull; ++g) {
      const int64_t c0 = g * gs > kb0 ? g * gs : kb0, c1 = min64(g * gs + gs, kfull);
      GemmParams p[NR];
      for (int r = 0; r < NR; ++r) p[r] = gemm_params<F>(w, n + r, g);
      for (int64_t c = c0; c < c1; c += kChunk) {
        prefetch_rows<NR>(row, c >> 1, ahead);
        chunk4<F, MR, NR, S, false>(row, c, 0, p, xb + (c - kb0), ldxb, 0, kChunk, acc);
      }
    }
    if (kfull < kb1) {
      GemmParams p[NR];
      for (int r = 0; r < NR; ++r) p[r] = gemm_params<F>(w, n + r, kfull / gs);
      chunk4<F, MR, NR, S, true>(row, kfull, (K + 1) / 2, p, xb + (kfull - kb0), ldxb, 0, kb1 - kfull, acc);
    }
  } else {
    walk_any_groups<F, MR, NR, S>(w, row, n, xb, ldxb, kb0, kb1, acc);
  }

  for (int r = 0; r < NR; ++r) {
    const float s = F == kInt8 ? static_cast<const float*>(w.scales)[n + r] : 1.0f;
    for (int m = 0; m < MR; ++m) {
      __m256 t = acc[0][m][r];
      if (S == 2) t = _mm256_add_ps(t, acc[S - 1][m][r]);
      float v = hsum(t) - corr[r];
      if (F == kInt8) v *= s;
      float* o = y + m * ldy + n + r;
      *o = first ? v : *o + v;
    }
  }
}

// Packs columns [k0, k1) of MR rows of x into xb (row stride ldxb), zero-padded to a whole
// chunk; 4-bit formats get each chunk's even columns first, then its odd ones.
template <int F>
static void pack_x(const float* x, int64_t ldx, int64_t mr, int64_t k0, int64_t k1, float* xb,
                   int64_t ldxb) {
  const int64_t len = k1 - k0;
  for (int64_t m = 0; m < mr; ++m) {
    const float* s = x + m * ldx + k0;
    float* d = xb + m * ldxb;
    for (int64_t c = 0; c < len; c += kChunk) {
      alignas(32) float tmp[kChunk];
      const float* src = s + c;
      if (c + kChunk > len) {  // the last, short chunk: copy what exists, zero the rest
        for (int64_t i = 0; i < kChunk; ++i) tmp[i] = c + i < len ? s[c + i] : 0.0f;
        src = tmp;
      }
      const __m256 a0 = _mm256_loadu_ps(src), a1 = _mm256_loadu_ps(src + 8);
      const __m256 a2 = _mm256_loadu_ps(src + 16), a3 = _mm256_loadu_ps(src + 24);
      if constexpr (F == kInt8 || F == kKindInt8Grouped) {
        _mm256_storeu_ps(d + c, a0);
        _mm256_storeu_ps(d + c + 8, a1);
        _mm256_storeu_ps(d + c + 16, a2);
        _mm256_storeu_ps(d + c + 24, a3);
      } else {
        // shuffle_ps picks within 128-bit lanes; the 64-bit permute puts the halves in order.
        const auto fix = [](__m256 v) {
          return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xd8));
        };
        _mm256_storeu_ps(d + c, fix(_mm256_shuffle_ps(a0, a1, 0x88)));
        _mm256_storeu_ps(d + c + 8, fix(_mm256_shuffle_ps(a2, a3, 0x88)));
        _mm256_storeu_ps(d + c + 16, fix(_mm256_shuffle_ps(a0, a1, 0xdd)));
        _mm256_storeu_ps(d + c + 24, fix(_mm256_shuffle_ps(a2, a3, 0xdd)));
      }
    }
  }
}

template <int F, int MR>
static void gemm_mblock(const QWeight& w, const float* x, int64_t ldx, int64_t n0, int64_t n1,
                        float* y, int64_t ldy) {
  constexpr int NR = nr_for(MR);
  constexpr int64_t kb = kXBlockFloats / MR / kChunk * kChunk;  // k block (whole chunks)
  alignas(32) float xb[kXBlockFloats];
  for (int64_t k0 = 0; k0 < w.K; k0 += kb) {
    const int64_t k1 = min64(w.K, k0 + kb);
    pack_x<F>(x, ldx, MR, k0, k1, xb, kb);
    const bool factored = F == kInt4 && MR == 1 && factor_ok(x + k0, k1 - k0, w.group);
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) gemm_block<F, MR, NR>(w, xb, kb, k0, k1, n, y, ldy, k0 == 0, factored);
    for (; n < n1; ++n) gemm_block<F, MR, 1>(w, xb, kb, k0, k1, n, y, ldy, k0 == 0, factored);
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

// The panel path's microkernel (panel_x86.h): MR rows of x times the 16 panel columns, 2 x MR
// accumulators (MR = 6: 12 of the 16 ymm), two FMAs per broadcast x[m, k].
template <int MR>
struct PanelMicro {
  __attribute__((noinline)) static void run(const float* x, int64_t ldx, const float* p, int64_t kb, float* y,
                                            int64_t ldy, int64_t nc, bool first) {
    __m256 c0[MR], c1[MR];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      c0[m] = _mm256_setzero_ps();
      c1[m] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < kb; ++k) {
      const __m256 b0 = _mm256_load_ps(p + k * panel::kPanelN), b1 = _mm256_load_ps(p + k * panel::kPanelN + 8);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m256 a = _mm256_broadcast_ss(x + m * ldx + k);
        c0[m] = _mm256_fmadd_ps(a, b0, c0[m]);
        c1[m] = _mm256_fmadd_ps(a, b1, c1[m]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      float* o = y + m * ldy;
      if (nc == panel::kPanelN) {
        if (!first) {
          c0[m] = _mm256_add_ps(c0[m], _mm256_loadu_ps(o));
          c1[m] = _mm256_add_ps(c1[m], _mm256_loadu_ps(o + 8));
        }
        _mm256_storeu_ps(o, c0[m]);
        _mm256_storeu_ps(o + 8, c1[m]);
      } else {
        alignas(32) float t[16];
        _mm256_store_ps(t, c0[m]);
        _mm256_store_ps(t + 8, c1[m]);
        for (int64_t i = 0; i < nc; ++i) o[i] = first ? t[i] : o[i] + t[i];
      }
    }
  }
};

// From this many activation rows the exact kernels take the panel path (panel_x86.h). A/B on
// the Emerald Rapids host (4096 x 4096, 1 thread): int4 / nf4 1.15-1.4x at M = 32 and 1.2-1.8x
// at 64-512; int8 (whose per-row kernel decodes with one conversion) 0.8-0.9x at 32, 1.2-1.4x
// at 64-128.
static constexpr int64_t kPanelMinM = 32, kPanelMinMInt8 = 64;

template <class Dq>
static void gemm_panels(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
                        float* y, int64_t ldy, Dq dq) {
  panel::gemm<6, PanelMicro>(w, x, M, ldx, n0, n1, y, ldy, dq);
}

void gemm_int8(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  if (M >= kPanelMinMInt8) return gemm_panels(w, x, M, ldx, n0, n1, y, ldy, dequant_int8);
  if (int8_per_row(w)) gemm_fmt<kInt8>(w, x, M, ldx, n0, n1, y, ldy);
  else gemm_fmt<kKindInt8Grouped>(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_int4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  if (M >= kPanelMinM) return gemm_panels(w, x, M, ldx, n0, n1, y, ldy, dequant_int4);
  if (w.float_offset) gemm_fmt<kKindInt4Offset>(w, x, M, ldx, n0, n1, y, ldy);
  else gemm_fmt<kInt4>(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_fp4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  if (M >= kPanelMinM) return gemm_panels(w, x, M, ldx, n0, n1, y, ldy, dequant_fp4);
  gemm_fmt<kFP4>(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_nf4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  if (M >= kPanelMinM) return gemm_panels(w, x, M, ldx, n0, n1, y, ldy, dequant_nf4);
  gemm_fmt<kNF4>(w, x, M, ldx, n0, n1, y, ldy);
}

}  // namespace avx2
}  // namespace lowbit
