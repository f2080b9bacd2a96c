// AVX-VNNI fast path: the kernel of kernels/qgemm_x86.h over 256-bit vectors with the
// VEX-encoded vpdpbusd (u8 x s8 summed straight into int32) of CPUs that have AVX-VNNI but no
// AVX-512 (Intel's client cores from Alder Lake on: most laptops sold since 2022). Same packed
// layout and activation quantizer as avx2 (its table uses avx2's pack and
// quantize_row).
#include "kernels/avx2/qvec.h"

namespace lowbit {
namespace avx2vnni {
using namespace detail;
using V = avx2::V256<true>;

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

}  // namespace avx2vnni
}  // namespace lowbit
