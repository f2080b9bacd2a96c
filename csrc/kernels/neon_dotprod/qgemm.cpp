// NEON + dotprod (armv8.2-a) fast path: the kernel of neon/qgemm_neon.h with sdot by lane.
// Same packed layout and activation quantizer as neon (its table uses neon's pack and
// quantize_row).
#include "kernels/neon/qgemm_neon.h"

namespace lowbit {
namespace neon_dotprod {
using namespace detail;

namespace {
struct Sdot {
  static constexpr bool kSdot = true;
  static inline void zero(BlockAcc<true>& a) { a.a = vdupq_n_s32(0); }
  // acc += c (4 rows x 4 codes) times activation quad `lane` of x, per row
  static inline __attribute__((always_inline)) void dot(BlockAcc<true>& a, int8x16_t c, int8x16_t x, int lane) {
    switch (lane) {  // constant after unrolling
      case 0: a.a = vdotq_laneq_s32(a.a, c, x, 0); break;
      case 1: a.a = vdotq_laneq_s32(a.a, c, x, 1); break;
      case 2: a.a = vdotq_laneq_s32(a.a, c, x, 2); break;
      default: a.a = vdotq_laneq_s32(a.a, c, x, 3); break;
    }
  }
  static inline int32x4_t finish(const BlockAcc<true>& a) { return a.a; }
};
}  // namespace

void qgemm_int8(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qgemm_neon<Sdot, kInt8>(w, p, x, n0, n1, y, ldy);
}
void qgemm_int4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qgemm_neon<Sdot, kInt4>(w, p, x, n0, n1, y, ldy);
}
void qgemm_nf4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qgemm_neon<Sdot, kNF4>(w, p, x, n0, n1, y, ldy);
}
void qgemm_fp4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qgemm_neon<Sdot, kFP4>(w, p, x, n0, n1, y, ldy);
}

}  // namespace neon_dotprod
}  // namespace lowbit
