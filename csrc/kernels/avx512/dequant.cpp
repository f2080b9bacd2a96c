// AVX-512 dequantization, bit-exact against generic/dequant.cpp: every weight is produced by
// the same float operations as the reference (int8: float(q - z) * s; 4-bit: a lookup in the
// group's table of the 16 values the reference would compute, see group_table). No FMA.
#include "kernels/avx512/simd.h"

namespace lowbit {
namespace avx512 {
using namespace detail;

// int8 with groups or zero-points: float(q - z) * s a group at a time (groups are multiples
// of 16 or the whole row); masked vectors at a group's or the row's ragged end.
static void dequant_int8_grouped(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const __m512 s = _mm512_set1_ps(group_scale(w, n, g));
      const __m512 z = _mm512_set1_ps(float(group_zero(w, n, g)));  // q - z is exact in float
      const int64_t k1 = min64(K, (g + 1) * w.group);
      for (int64_t k = g * w.group; k < k1; k += 16) {
        const __mmask16 m = first_lanes16(k1 - k);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + k)));
        _mm512_mask_storeu_ps(o + k, m, _mm512_mul_ps(_mm512_sub_ps(v, z), s));
      }
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
    const __m512 s = _mm512_set1_ps(static_cast<const float*>(w.scales)[n]);
    float* o = out + (n - n0) * ldo;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512i a = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
      const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16)));
      _mm512_storeu_ps(o + k, _mm512_mul_ps(_mm512_cvtepi32_ps(a), s));
      _mm512_storeu_ps(o + k + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(b), s));
    }
    for (; k < K; k += 16) {  // masked tail: no read past the row, no write past K
      const __mmask16 m = first_lanes16(K - k);
      const __m512i a = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + k));
      _mm512_mask_storeu_ps(o + k, m, _mm512_mul_ps(_mm512_cvtepi32_ps(a), s));
    }
  }
}

// One chunk at k = c: lanes [lo, hi) are written (all 32 when !kPartial).
template <bool kPartial>
static inline void dequant_chunk(const uint8_t* row, int64_t c, int64_t rb, __m512 t, float* o,
                                 int64_t lo, int64_t hi) {
  const __m128i b = kPartial ? load_code_bytes(row, c, rb)
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (c >> 1)));
  // Codes in k order, one per byte; bits 4..7 of each byte are garbage that vpermps ignores
  // (it reads index bits 0..3 only).
  const __m128i h = _mm_srli_epi16(b, 4);  // low nibble of each byte = high nibble of b
  const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, h)), t);
  const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(b, h)), t);
  if (kPartial) {
    const uint32_t bits = lane_bits(lo, hi);
    _mm512_mask_storeu_ps(o + c, __mmask16(bits & 0xffff), w0);
    _mm512_mask_storeu_ps(o + c + 16, __mmask16(bits >> 16), w1);
  } else {
    _mm512_storeu_ps(o + c, w0);
    _mm512_storeu_ps(o + c + 16, w1);
  }
}

template <int F>
static void dequant_nibbles(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = w.K, G = w.n_groups, gs = w.group;
  const int64_t rb = (K + 1) / 2;  // bytes of codes in a row (the end that must not be passed)
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * w.ld_data;
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs, k1 = min64(K, k0 + gs);
      const __m512 t = group_table<F>(w, n, g);
      int64_t c = k0 & ~(kChunk - 1);
      if (c < k0) {  // group starts inside a chunk
        dequant_chunk<true>(row, c, rb, t, o, k0 - c, min64(k1 - c, kChunk));
        c += kChunk;
      }
      for (; c + kChunk <= k1; c += kChunk) dequant_chunk<false>(row, c, rb, t, o, 0, kChunk);
      if (c < k1) dequant_chunk<true>(row, c, rb, t, o, 0, k1 - c);
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

}  // namespace avx512
}  // namespace lowbit
