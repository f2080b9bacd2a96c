// AVX-512 (F/BW/VL) element conversions, bit-exact against the scalar helpers of common.h:
// round-to-nearest-even, NaN stays NaN with the same bits. bf16 rounding is done with integer
// ops (no AVX512-BF16, which this ISA level does not require); tails use masked loads/stores.
#include <immintrin.h>

#include "kernels/avx512/simd.h"

namespace lowbit {
namespace avx512 {
using namespace detail;

void f32_to_f32(const void* src, float* dst, int64_t n) {
  std::memcpy(dst, src, size_t(n) * sizeof(float));
}

void f32_from_f32(const float* src, void* dst, int64_t n) {
  std::memcpy(dst, src, size_t(n) * sizeof(float));
}

// bf16 is the high half of an f32: widen and shift (exact for every pattern, NaN included).
void bf16_to_f32v(const void* src, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes16(n - i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, s + i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
}

// 16 halves -> 16 floats. vcvtph2ps is exact for every finite / infinite half, but quiets a
// signaling NaN; the reference keeps the payload bits as they are, so NaN lanes (rare) are
// rebuilt with the reference's formula: sign | 0x7f800000 | (mantissa << 13).
static inline __m512 f16x16_to_f32(__m256i h) {
  __m512 r = _mm512_cvtph_ps(h);
  const __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
  if (nan) {
    const __m512i e = _mm512_cvtepu16_epi32(h);
    const __m512i bits = _mm512_or_si512(
        _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(e, _mm512_set1_epi32(0x8000)), 16),
                        _mm512_set1_epi32(0x7f800000)),
        _mm512_slli_epi32(_mm512_and_si512(e, _mm512_set1_epi32(0x3ff)), 13));
    r = _mm512_mask_mov_ps(r, nan, _mm512_castsi512_ps(bits));
  }
  return r;
}

void f16_to_f32v(const void* src, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, f16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
  if (i < n) {
    const __mmask16 m = first_lanes16(n - i);
    _mm512_mask_storeu_ps(dst + i, m, f16x16_to_f32(_mm256_maskz_loadu_epi16(m, s + i)));
  }
}

// f32 -> bf16 bits in the low half of each 32-bit lane: u + 0x7fff + lsb, >> 16 (RNE); NaN
// becomes (u >> 16) | 0x40 (quiet). The add cannot wrap for non-NaN inputs.
static inline __m256i f32x16_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rnd = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i nanv = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 isnan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rnd, isnan, nanv));  // values <= 0xffff
}

void f32_to_bf16v(const float* src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), f32x16_to_bf16(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = first_lanes16(n - i);
    _mm256_mask_storeu_epi16(d + i, m, f32x16_to_bf16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

// vcvtps2ph with round-to-nearest-even matches the reference for every input: overflow to inf
// at >= 65520, subnormal halves rounded RNE, NaN -> sign | 0x7e00 | (mantissa >> 13).
void f32_to_f16v(const float* src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // RNE, no exceptions
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kRne));
  if (i < n) {
    const __mmask16 m = first_lanes16(n - i);
    _mm256_mask_storeu_epi16(d + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), kRne));
  }
}

}  // namespace avx512
}  // namespace lowbit
