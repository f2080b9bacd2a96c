// AVX2 vector operations for the fast-path kernel of kernels/qgemm_x86.h (8 int32 lanes = 8 rows
// per tile). Included by avx2/qgemm.cpp (kVnni = false: vpmaddubsw + vpmaddwd) and
// avx2vnni/qgemm.cpp (kVnni = true: AVX-VNNI's VEX-encoded vpdpbusd, on Intel's client cores
// from Alder Lake on, which have no AVX-512); the activation quantizer and the packed layout are
// avx2's for both.
#pragma once
#include "kernels/qgemm_x86.h"

namespace lowbit {
namespace avx2 {
namespace {  // (one definition per translation unit)

// 256-bit vector operations for qx86 (8 int32 lanes = 8 rows per tile).
template <bool kVnniT>
struct V256 {
  using I = __m256i;
  using F = __m256;
  using Sign = __m256i;  // vpsignb takes the sign from the code vector itself
  static constexpr int64_t kT = 8;
  static constexpr bool kVnni = kVnniT;
  static constexpr int kNT1 = 2;  // tiles per call at M = 1
  static constexpr int kMR = 4;   // activation rows per call at M > 1
  static constexpr bool kGacc = true;  // group accumulators (one scale multiply per group): measured faster at M >= 8 too
  static inline I loadi(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static inline I zeroi() { return _mm256_setzero_si256(); }
  static inline I set1_8(int c) { return _mm256_set1_epi8(char(c)); }
  static inline I set1_32(int32_t c) { return _mm256_set1_epi32(c); }
  static inline I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static inline I srli4(I a) { return _mm256_srli_epi16(a, 4); }
  static inline I shuffle8(I tbl, I idx) { return _mm256_shuffle_epi8(tbl, idx); }
  // the 16 bytes tbl[i] + off in both 128-bit lanes (a vpshufb table)
  static inline I table16(const int8_t* tbl, int off) {
    return _mm256_broadcastsi128_si256(_mm_add_epi8(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(tbl)), _mm_set1_epi8(char(off))));
  }
  static inline I slli32(I a, int n) { return _mm256_slli_epi32(a, n); }
  static inline I maddubs(I u, I s) { return _mm256_maddubs_epi16(u, s); }
  static inline I madd1(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
  static inline I madd128(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(128)); }
  static inline I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static inline I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static inline I abs8(I a) { return _mm256_abs_epi8(a); }
  static inline Sign sign_of(I c) { return c; }
  static inline I apply_sign(I x, Sign c) { return _mm256_sign_epi8(x, c); }
  static inline I flip_sign(I c) { return _mm256_xor_si256(c, _mm256_set1_epi8(char(0x80))); }
  template <bool B = kVnniT>
  static inline I dpbusd(I acc, I u, I s) {
    if constexpr (B) return _mm256_dpbusd_avx_epi32(acc, u, s);  // AVX-VNNI (VEX-encoded vpdpbusd)
    else return acc;  // not used without VNNI
  }
  static inline F zerof() { return _mm256_setzero_ps(); }
  static inline F set1f(float f) { return _mm256_set1_ps(f); }
  static inline F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline F load_u8f(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline void store(float* p, F v, int64_t n) {
    if (n == kT) {
      _mm256_storeu_ps(p, v);
      return;
    }
    alignas(32) float buf[kT];
    _mm256_store_ps(buf, v);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }
};

}  // namespace

}  // namespace avx2
}  // namespace lowbit
