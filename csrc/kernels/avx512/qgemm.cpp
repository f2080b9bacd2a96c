// AVX-512 (F/BW/VL/DQ) fast path: activation quantizer, packing (tiles of 16 rows) and the
// int8-dot kernel of kernels/qgemm_x86.h with vpmaddubsw + vpmaddwd (CPUs without VNNI; the
// avx512vnni table reuses this file's quantizer and packing).
#include "kernels/avx512/qvec.h"

namespace lowbit {
namespace avx512 {
using namespace detail;
using V = V512<false>;

void quantize_row(const float* x, int64_t K, int64_t block, int8_t* q, float* d, int32_t* sum) {
  quantize_row_avx512(x, K, block, q, d, sum);
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

}  // namespace avx512
}  // namespace lowbit
