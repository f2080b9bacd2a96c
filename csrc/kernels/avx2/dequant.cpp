// AVX2 dequantization, bit-exact against generic/dequant.cpp: every weight is produced by the
// same float operations as the reference (int8: float(q - z) * s; int4: float(q - z) * s, or
// float(q) * s + m with float offsets; nf4 / fp4: codebook[q] * absmax with the absmax
// computed by the same scalar code). No FMA here.
#include "kernels/avx2/simd.h"

namespace lowbit {
namespace avx2 {
using namespace detail;

// int8 with groups or zero-points: float(q - z) * s, a group at a time (groups are multiples
// of 16, so 8-wide vectors never straddle two); q - z is exact in float.
static void dequant_int8_grouped(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float s = group_scale(w, n, g);
      const int z = group_zero(w, n, g);
      const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(float(z));
      const int64_t k1 = min64(K, (g + 1) * w.group);
      int64_t k = g * w.group;
      for (; k + 8 <= k1; k += 8) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(v, vz), vs));
      }
      for (; k < k1; ++k) o[k] = float(int(q[k]) - z) * s;
    }
  }
}

void dequant_int8(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (!int8_per_row(w)) {
    dequant_int8_grouped(w, n0, n1, out, ldo);
    return;
  }
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
    const float s = static_cast<const float*>(w.scales)[n];
    const __m256 vs = _mm256_set1_ps(s);
    float* o = out + (n - n0) * ldo;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      for (int j = 0; j < 4; ++j) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k + 8 * j));
        _mm256_storeu_ps(o + k + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vs));
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
      _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vs));
    }
    for (; k < K; ++k) o[k] = float(q[k]) * s;
  }
}

// Segment J of a chunk at o (= out row + kb), lanes [lo, hi) of the chunk belong to the group.
template <int F, int J, bool kPartial>
static inline void store_seg(float* o, __m128i c0, __m128i c1, const GroupParams& p, int64_t lo,
                             int64_t hi) {
  if (kPartial) {
    const int64_t l0 = lo - 8 * J, l1 = hi - 8 * J;  // lane range relative to this segment
    if (l1 <= 0 || l0 >= 8) return;
    const __m256 v = decode8<F>(seg_bytes<J>(c0, c1), p);
    if (l0 <= 0 && l1 >= 8) {
      _mm256_storeu_ps(o + 8 * J, v);
    } else {
      store_lanes(o + 8 * J, v, l0 < 0 ? 0 : l0, l1 > 8 ? 8 : l1);
    }
  } else {
    _mm256_storeu_ps(o + 8 * J, decode8<F>(seg_bytes<J>(c0, c1), p));
  }
}

template <int F, bool kPartial>
static inline void dequant_chunk(const uint8_t* row, int64_t kb, int64_t rb, const GroupParams& p,
                                 float* o, int64_t lo, int64_t hi) {
  const __m128i b = kPartial ? load_code_bytes(row, kb, rb)
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (kb >> 1)));
  __m128i c0, c1;
  split_codes<F>(b, p, c0, c1);
  store_seg<F, 0, kPartial>(o + kb, c0, c1, p, lo, hi);
  store_seg<F, 1, kPartial>(o + kb, c0, c1, p, lo, hi);
  store_seg<F, 2, kPartial>(o + kb, c0, c1, p, lo, hi);
  store_seg<F, 3, kPartial>(o + kb, c0, c1, p, lo, hi);
}

// Group by group; inside group [k0, k1) the chunks start at (k0 & ~1), (k0 & ~1) + 32, ...
// (each on a byte boundary). Full chunks are stored whole; a partial one (odd group start, group
// end) stores only its lanes inside the group, so neighbouring groups are never overwritten.
template <int F>
static void dequant_nibbles(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = w.K, G = w.n_groups, gs = w.group;
  const int64_t rb = (K + 1) / 2;  // bytes of codes in a row (the end that must not be passed)
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * w.ld_data;
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs, k1 = min64(K, k0 + gs);
      const GroupParams p = group_params<F>(w, n, g);
      int64_t kb = k0 & ~int64_t(1);
      if (kb < k0) {  // odd group start: lane 0 belongs to the previous group
        dequant_chunk<F, true>(row, kb, rb, p, o, 1, min64(k1 - kb, kChunk));
        kb += kChunk;
      }
      for (; kb + kChunk <= k1; kb += kChunk) dequant_chunk<F, false>(row, kb, rb, p, o, 0, kChunk);
      if (kb < k1) dequant_chunk<F, true>(row, kb, rb, p, o, 0, k1 - kb);
    }
  }
}

void dequant_int4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (w.float_offset) dequant_nibbles<kKindInt4Offset>(w, n0, n1, out, ldo);
  else dequant_nibbles<kInt4>(w, n0, n1, out, ldo);
}

void dequant_nf4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  dequant_nibbles<kNF4>(w, n0, n1, out, ldo);
}

void dequant_fp4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  dequant_nibbles<kFP4>(w, n0, n1, out, ldo);
}

}  // namespace avx2
}  // namespace lowbit
