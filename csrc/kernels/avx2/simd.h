// AVX2 building blocks shared by the kernel files of this folder. Everything is `static inline`
// (internal linkage): each .cpp gets its own copy compiled with this folder's flags, so no copy
// can leak into code that runs on a CPU without AVX2 (see kernel_api.h).
//
// A 4-bit row is walked in chunks of kChunk = 32 codes, i.e. 16 bytes; a chunk starts on an
// even k so that it starts on a byte boundary (dequant.cpp and gemm.cpp say where the chunks
// of a group lie). Only lanes [lo, hi) of a "partial" chunk belong to the group at hand.
// Reads never pass the end of a row: a chunk whose 16 code bytes would cross it is copied into
// a zeroed buffer, and partial lanes of floats are copied element by element (AVX2 vmaskmov may
// touch masked-out lanes on some CPUs - AMD documents it as implementation dependent - so it is
// not used on memory that may end at a page boundary).
#pragma once
#include <immintrin.h>

#include <cstring>

#include "kernels/common.h"

namespace lowbit {
namespace avx2 {
using namespace detail;  // the scalar helpers and kernel kinds of kernels/common.h

// Codes per chunk: one 16-byte load of packed nibbles (or 32 int8 codes), 4 vectors of 8.
static constexpr int64_t kChunk = 32;

// Per-row parameters of one group, prepared once per group.
//  int4: a = broadcast scale, z = broadcast zero-point bytes (codes - z are then exact int8);
//  int4 with float offsets (kKindInt4Offset): a = scale, b = offset, z = 0;
//  nf4 / fp4: a = codebook[0..7] * absmax, b = codebook[8..15] * absmax (the products the
//        scalar reference computes, so a table lookup yields bit-exact dequantized weights).
struct GroupParams {
  __m256 a, b;
  __m128i z;
};

// Whether a kernel kind decodes integer 4-bit codes (no codebook).
static constexpr bool int_nibbles(int F) { return F == kInt4 || F == kKindInt4Offset; }

template <int F>
static inline GroupParams group_params(const QWeight& w, int64_t n, int64_t g) {
  GroupParams p;
  const int64_t i = n * w.n_groups + g;
  if constexpr (F == kInt4) {
    const float s = static_cast<const float*>(w.scales)[i];
    const int z = group_zero(w, n, g);
    p.a = _mm256_set1_ps(s);
    p.b = p.a;
    p.z = _mm_set1_epi8(char(z));
  } else if constexpr (F == kKindInt4Offset) {
    p.a = _mm256_set1_ps(static_cast<const float*>(w.scales)[i]);
    p.b = _mm256_set1_ps(group_offset(w, n, g));
    p.z = _mm_setzero_si128();
  } else {
    const float* cb = F == kNF4 ? kNF4Codebook : kFP4Codebook;
    const __m256 vs = _mm256_set1_ps(group_scale(w, n, g));  // double quant: two roundings
    p.a = _mm256_mul_ps(_mm256_loadu_ps(cb), vs);
    p.b = _mm256_mul_ps(_mm256_loadu_ps(cb + 8), vs);
    p.z = _mm_setzero_si128();
  }
  return p;
}

// The 16 bytes holding codes [kb, kb + 32) of a packed row of rb bytes (kb even). A chunk that
// would run past the row is copied into a zeroed buffer: no byte at or past rb is read.
static inline __m128i load_code_bytes(const uint8_t* row, int64_t kb, int64_t rb) {
  const int64_t b0 = kb >> 1;
  if (b0 + 16 <= rb) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b0));
  alignas(16) uint8_t buf[16] = {};
  std::memcpy(buf, row + b0, size_t(rb - b0));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

// Packed bytes -> one code per byte in k order: c0 = codes [kb, kb+16), c1 = [kb+16, kb+32).
// int4 clears the high nibbles and subtracts the zero-point (exact int8 in [-15, 15]; the
// float-offset kind keeps the codes 0..15); nf4 / fp4 leave garbage in bits 4..7, which their
// lookup ignores (it uses bits 0..3 only).
template <int F>
static inline void split_codes(__m128i b, const GroupParams& p, __m128i& c0, __m128i& c1) {
  __m128i lo = b;
  __m128i hi = _mm_srli_epi16(b, 4);  // low nibble of each byte = high nibble of the source
  if constexpr (int_nibbles(F)) {
    const __m128i m = _mm_set1_epi8(0x0f);
    lo = _mm_and_si128(lo, m);
    hi = _mm_and_si128(hi, m);
  }
  c0 = _mm_unpacklo_epi8(lo, hi);
  c1 = _mm_unpackhi_epi8(lo, hi);
  if constexpr (F == kInt4) {
    c0 = _mm_sub_epi8(c0, p.z);
    c1 = _mm_sub_epi8(c1, p.z);
  }
}

// Code bytes of segment j (lanes 8j .. 8j+7 of the chunk) in the low 8 bytes.
template <int J>
static inline __m128i seg_bytes(__m128i c0, __m128i c1) {
  if constexpr (J == 0) return c0;
  if constexpr (J == 1) return _mm_unpackhi_epi64(c0, c0);
  if constexpr (J == 2) return c1;
  return _mm_unpackhi_epi64(c1, c1);
}

// 8 dequantized weights from 8 code bytes: the exact float the reference computes.
template <int F>
static inline __m256 decode8(__m128i q, const GroupParams& p) {
  if constexpr (F == kInt4) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), p.a);
  } else if constexpr (F == kKindInt4Offset) {  // q * s, then + m: two roundings, no FMA
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), p.a), p.b);
  } else {
    const __m256i idx = _mm256_cvtepu8_epi32(q);
    const __m256 lo = _mm256_permutevar8x32_ps(p.a, idx);  // uses idx bits 0..2
    const __m256 hi = _mm256_permutevar8x32_ps(p.b, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3
  }
}

// Writes lanes lo..hi-1 of v to p[lo..hi); writes nothing else.
static inline void store_lanes(float* p, __m256 v, int64_t lo, int64_t hi) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  for (int64_t i = lo; i < hi; ++i) p[i] = buf[i];
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace avx2
}  // namespace lowbit
