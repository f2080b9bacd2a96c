// AVX2 fast path: activation quantizer (bit-identical to generic's), packing (tiles of 8 rows)
// and the int8-dot kernel of kernels/qgemm_x86.h over 256-bit vectors (vpmaddubsw + vpmaddwd).
#include "kernels/avx2/qvec.h"

namespace lowbit {
namespace avx2 {
using namespace detail;
using V = V256<false>;

// 8 floats -> RNE int32 (mode-independent, like qpack::round_half_even).
static inline __m256i quant8(__m256 v, __m256 inv) {
  return _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <int64_t B>
static void quantize_row_b(const float* x, int64_t K, int8_t* q, float* d, int32_t* sum) {
  constexpr int64_t kQBlock = B;
  constexpr int kV = int(kQBlock / 8);  // vectors of 8 floats per block
  const int64_t nb = ceil_div(K, kQChunk) * (kQChunk / kQBlock);  // a block past K is all zero
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * kQBlock, len = k0 < K ? min64(kQBlock, K - k0) : 0;
    alignas(32) float tmp[kQBlock];
    const float* src = x + k0;
    if (len < kQBlock) {  // copy the short last block (zeros change neither max nor codes)
      for (int64_t i = 0; i < kQBlock; ++i) tmp[i] = i < len ? src[i] : 0.0f;
      src = tmp;
    }
    __m256 v[kV];
    __m256i mx = _mm256_setzero_si256();
    for (int i = 0; i < kV; ++i) {
      v[i] = _mm256_loadu_ps(src + 8 * i);
      mx = _mm256_max_epi32(mx, _mm256_and_si256(_mm256_castps_si256(v[i]), absmask));
    }
    __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4e));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xb1));
    const uint32_t amax = uint32_t(_mm_cvtsi128_si32(m4));
    float inv = 0.0f;
    if (!qpack::block_scale(amax, d[b], inv)) {
      std::memset(q + k0, 0, size_t(kQBlock));
      sum[b] = 0;
      continue;
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i iv[kV];
    __m256i s = _mm256_setzero_si256();
    for (int i = 0; i < kV; ++i) {
      iv[i] = quant8(v[i], vinv);
      s = _mm256_add_epi32(s, iv[i]);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    sum[b] = _mm_cvtsi128_si32(s4);
    // narrow to bytes: packs works within 128-bit lanes, the qword permute restores k order
    const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(iv[0], iv[kV - 1]), 0xd8);
    const __m128i p8 = _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
    if constexpr (kV == 2) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0), p8);
    else _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k0), p8);
  }
}

void quantize_row(const float* x, int64_t K, int64_t block, int8_t* q, float* d, int32_t* sum) {
  if (block == 8) quantize_row_b<8>(x, K, q, d, sum);
  else quantize_row_b<16>(x, K, q, d, sum);
}

int64_t packed_size_int8(const QWeight& w) { return qpack::packed_size(w, V::kT); }
int64_t packed_size_int4(const QWeight& w) { return qpack::packed_size(w, V::kT); }
int64_t packed_size_nf4(const QWeight& w) { return qpack::packed_size(w, V::kT); }
int64_t packed_size_fp4(const QWeight& w) { return qpack::packed_size(w, V::kT); }
void pack_int8(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, V::kT); }
void pack_int4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, V::kT); }
void pack_nf4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, V::kT); }
void pack_fp4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, V::kT); }

LOWBIT_QX86_QGEMM_ENTRIES(V)

}  // namespace avx2
}  // namespace lowbit
