// AVX2 + F16C element conversions, bit-exact against the scalar helpers of common.h:
// round-to-nearest-even, NaN stays NaN with the same bits. Tails (< one vector) use the scalar
// helpers themselves.
#include <immintrin.h>

#include "kernels/common.h"

namespace lowbit {
namespace avx2 {
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
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i a = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16);
    const __m256i b = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(a));
    _mm256_storeu_ps(dst + i + 8, _mm256_castsi256_ps(b));
  }
  for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
}

// 8 halves -> 8 floats. vcvtph2ps is exact for every finite / infinite half, but quiets a
// signaling NaN; the reference keeps the payload bits as they are, so NaN lanes (rare) are
// rebuilt with the reference's formula: sign | 0x7f800000 | (mantissa << 13).
static inline __m256 f16x8_to_f32(__m128i h) {
  __m256 r = _mm256_cvtph_ps(h);
  const __m256 nan = _mm256_cmp_ps(r, r, _CMP_UNORD_Q);
  if (_mm256_movemask_ps(nan)) {
    const __m256i e = _mm256_cvtepu16_epi32(h);
    const __m256i bits = _mm256_or_si256(
        _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(e, _mm256_set1_epi32(0x8000)), 16),
                        _mm256_set1_epi32(0x7f800000)),
        _mm256_slli_epi32(_mm256_and_si256(e, _mm256_set1_epi32(0x3ff)), 13));
    r = _mm256_blendv_ps(r, _mm256_castsi256_ps(bits), nan);
  }
  return r;
}

void f16_to_f32v(const void* src, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 8));
    _mm256_storeu_ps(dst + i, f16x8_to_f32(a));
    _mm256_storeu_ps(dst + i + 8, f16x8_to_f32(b));
  }
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, f16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
}

// f32 -> bf16 bits in the low half of each 32-bit lane: u + 0x7fff + lsb, >> 16 (RNE); NaN
// becomes (u >> 16) | 0x40 (quiet). The add cannot wrap for non-NaN inputs.
static inline __m256i f32x8_to_bf16_lanes(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rnd = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nanv = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i isnan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rnd, nanv, isnan);
}

void f32_to_bf16v(const float* src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = f32x8_to_bf16_lanes(_mm256_loadu_ps(src + i));
    const __m256i b = f32x8_to_bf16_lanes(_mm256_loadu_ps(src + i + 8));
    // lanes hold values <= 0xffff, so the unsigned-saturating pack is a plain narrowing;
    // packus interleaves 128-bit halves: [a0-3 b0-3 | a4-7 b4-7] -> reorder quadwords.
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), p);
  }
  for (; i < n; ++i) d[i] = f32_to_bf16(src[i]);
}

// vcvtps2ph with round-to-nearest-even matches the reference for every input: overflow to inf
// at >= 65520, subnormal halves rounded RNE, NaN -> sign | 0x7e00 | (mantissa >> 13).
void f32_to_f16v(const float* src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // RNE, no exceptions
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRne);
    const __m128i b = _mm256_cvtps_ph(_mm256_loadu_ps(src + i + 8), kRne);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 8), b);
  }
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRne));
  for (; i < n; ++i) d[i] = f32_to_f16(src[i]);
}

}  // namespace avx2
}  // namespace lowbit
