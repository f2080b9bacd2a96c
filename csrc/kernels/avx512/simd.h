// AVX-512 (F/BW/VL/DQ) building blocks shared by the kernel files of this folder. Everything
// is `static inline` (internal linkage): each .cpp gets its own copy compiled with this
// folder's flags, so no copy can leak into code that runs on an older CPU (see kernel_api.h).
//
// Rows are walked in chunks of kChunk = 32 codes on the global grid of multiples of 32 (so a
// chunk starts on a byte boundary). A group [k0, k1) covers the chunks from (k0 & ~31) to k1;
// chunks not wholly inside it are "partial" and only their lanes [lo, hi) count. Partial
// chunks use masked loads / stores: AVX-512 masking suppresses faults on masked-out elements,
// so nothing at or past the end of a row is ever touched.
#pragma once
// GCC 12's avx512fintrin.h initialises its "undefined" vectors from themselves, which
// -W(maybe-)uninitialized reports wherever such an intrinsic is inlined: a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "kernels/common.h"

namespace lowbit {
namespace avx512 {
using namespace detail;  // the scalar helpers and kernel kinds of kernels/common.h

// Codes per chunk: one 16-byte load of packed nibbles (or 32 int8 codes), 2 vectors of 16.
static constexpr int64_t kChunk = 32;

// The 16 possible dequantized values of one group of a 4-bit row, each computed with the
// reference's own operations (int4: float(q - z) * s; int4 with float offsets: float(q) * s,
// then + m; nf4 / fp4: codebook[q] * absmax), so a vpermps lookup gives bit-exact weights.
// F is a Format or kKindInt4Offset (common.h).
template <int F>
static inline __m512 group_table(const QWeight& w, int64_t n, int64_t g) {
  const __m512i q = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 s = _mm512_set1_ps(detail::group_scale(w, n, g));  // double quant: 2 roundings
  if constexpr (F == kInt4) {
    const int z = detail::group_zero(w, n, g);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(z))), s);
  } else if constexpr (F == kKindInt4Offset) {
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(q), s);
    return _mm512_add_ps(t, _mm512_set1_ps(detail::group_offset(w, n, g)));
  } else {
    return _mm512_mul_ps(_mm512_loadu_ps(F == kNF4 ? kNF4Codebook : kFP4Codebook), s);
  }
}

// Lanes [lo, hi) of a 32-lane chunk as a bit mask (0 <= lo < hi <= 32).
static inline uint32_t lane_bits(int64_t lo, int64_t hi) {
  const uint64_t upto_hi = (uint64_t(1) << hi) - 1;  // 64-bit: hi may be 32
  return uint32_t(upto_hi & ~((uint64_t(1) << lo) - 1));
}

// Mask of the first n (may be <= 0 or >= 16) of 16 lanes.
static inline __mmask16 first_lanes16(int64_t n) {
  if (n <= 0) return 0;
  if (n >= 16) return 0xffff;
  return __mmask16((1u << n) - 1);
}

// The 16 bytes holding codes [c, c + 32) of a packed row of rb bytes (c even); bytes at or
// past rb are not read (masked load).
static inline __m128i load_code_bytes(const uint8_t* row, int64_t c, int64_t rb) {
  const int64_t b0 = c >> 1;
  return _mm_maskz_loadu_epi8(first_lanes16(rb - b0), row + b0);
}

}  // namespace avx512
}  // namespace lowbit
