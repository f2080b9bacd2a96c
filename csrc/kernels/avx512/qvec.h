// AVX-512 vector operations for the fast-path kernel of kernels/qgemm_x86.h (16 int32 lanes =
// 16 rows per tile), and the activation quantizer. Included by avx512/qgemm.cpp (kVnni =
// false: vpmaddubsw + vpmaddwd, AVX-512BW) and avx512vnni/qgemm.cpp (kVnni = true: vpdpbusd);
// the activation quantizer and the packed layout are the same for both.
#pragma once
#include "kernels/avx512/simd.h"
#include "kernels/qgemm_x86.h"

namespace lowbit {
namespace {  // (one definition per translation unit)

template <bool kVnniT>
struct V512 {
  using I = __m512i;
  using F = __m512;
  using Sign = __mmask64;  // AVX-512 has no vpsignb: negate the activation bytes under a mask
  static constexpr int64_t kT = 16;
  static constexpr bool kVnni = kVnniT;
  static constexpr int kNT1 = 2;  // tiles per call at M = 1
  static constexpr int kMR = 8;   // activation rows per call at M > 1
  static constexpr bool kGacc = true;  // group accumulators: one scale multiply per group
  static inline I loadi(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static inline I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static inline I zeroi() { return _mm512_setzero_si512(); }
  static inline I set1_8(int c) { return _mm512_set1_epi8(char(c)); }
  static inline I set1_32(int32_t c) { return _mm512_set1_epi32(c); }
  static inline I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static inline I srli4(I a) { return _mm512_srli_epi16(a, 4); }
  static inline I shuffle8(I tbl, I idx) { return _mm512_shuffle_epi8(tbl, idx); }
  // the 16 bytes tbl[i] + off in all four 128-bit lanes (a vpshufb table)
  static inline I table16(const int8_t* tbl, int off) {
    return _mm512_broadcast_i32x4(_mm_add_epi8(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(tbl)), _mm_set1_epi8(char(off))));
  }
  static inline I slli32(I a, int n) { return _mm512_slli_epi32(a, unsigned(n)); }
  static inline I maddubs(I u, I s) { return _mm512_maddubs_epi16(u, s); }
  static inline I madd1(I a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
  static inline I madd128(I a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(128)); }
  static inline I add16(I a, I b) { return _mm512_add_epi16(a, b); }
  static inline I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static inline I abs8(I a) { return _mm512_abs_epi8(a); }
  static inline Sign sign_of(I c) { return _mm512_movepi8_mask(c); }
  static inline I apply_sign(I x, Sign neg) { return _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x); }
  static inline I flip_sign(I c) { return _mm512_xor_si512(c, _mm512_set1_epi8(char(0x80))); }
  template <bool B = kVnniT>
  static inline I dpbusd(I acc, I u, I s) {
    if constexpr (B) return _mm512_dpbusd_epi32(acc, u, s);
    else return acc;  // not used without VNNI
  }
  static inline F zerof() { return _mm512_setzero_ps(); }
  static inline F set1f(float f) { return _mm512_set1_ps(f); }
  static inline F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline F load_u8f(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline void store(float* p, F v, int64_t n) {
    _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v);  // n in 1..16; masked lanes untouched
  }
};

// The activation quantizer, bit-identical to generic's (kernel_api.h): max |x| on the bit
// patterns, scalar d and 1/d, vrndscaleps RNE (mode-independent), saturating narrow (exact:
// the codes are within [-127, 127]). A block is one zmm; the short last one is loaded masked.
static inline void quantize_row_avx512(const float* x, int64_t K, int64_t kQBlock, int8_t* q, float* d,
                                       int32_t* sum) {
  using namespace detail;
  const int64_t nb = ceil_div(K, kQChunk) * (kQChunk / kQBlock);  // a block past K is all zero
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  const __mmask16 lanes = avx512::first_lanes16(kQBlock);  // a block is (the low lanes of) one zmm
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * kQBlock;
    const __mmask16 in = lanes & avx512::first_lanes16(K - k0);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + k0);
    const uint32_t amax = uint32_t(_mm512_reduce_max_epi32(_mm512_and_si512(_mm512_castps_si512(v), absmask)));
    float inv = 0.0f;
    if (!qpack::block_scale(amax, d[b], inv)) {
      std::memset(q + k0, 0, size_t(kQBlock));
      sum[b] = 0;
      continue;
    }
    constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i i0 = _mm512_cvttps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(inv)), kRne));
    sum[b] = _mm512_reduce_add_epi32(i0);  // lanes past the block are 0
    _mm_mask_storeu_epi8(q + k0, __mmask16(lanes), _mm512_cvtsepi32_epi8(i0));
  }
}

}  // namespace
}  // namespace lowbit
