// AVX-512 VNNI fast path: the kernel of kernels/qgemm_x86.h with vpdpbusd (u8 x s8 summed
// straight into int32). Same packed layout and activation quantizer as avx512 (its table uses
// avx512's pack and quantize_row).
#include "kernels/avx512/qvec.h"

namespace lowbit {
namespace avx512vnni {
using namespace detail;
using V = V512<true>;

void qgemm_int8(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qx86::qgemm<V, kInt8>(w, p, x, n0, n1, y, ldy);
}
void qgemm_int4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qx86::qgemm<V, kInt4>(w, p, x, n0, n1, y, ldy);
}
void qgemm_nf4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qx86::qgemm<V, kNF4>(w, p, x, n0, n1, y, ldy);
}
void qgemm_fp4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qx86::qgemm<V, kFP4>(w, p, x, n0, n1, y, ldy);
}

}  // namespace avx512vnni
}  // namespace lowbit
