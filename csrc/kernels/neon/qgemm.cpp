// NEON fast path at the armv8-a baseline: activation quantizer, packing (tiles of 4 rows) and
// the int8-dot kernel of neon/qgemm_neon.h with vmull_s8 + vpadalq_s16 (the neon_dotprod table
// reuses this file's quantizer and packing with an sdot kernel).
#include "kernels/neon/qgemm_neon.h"

namespace lowbit {
namespace neon {
using namespace detail;

namespace {
struct MullDot {
  static constexpr bool kSdot = false;
  static inline void zero(BlockAcc<false>& a) {
    a.lo = vdupq_n_s32(0);
    a.hi = vdupq_n_s32(0);
  }
  // acc += c (4 rows x 4 codes) times activation quad `lane` of x, per row
  static inline __attribute__((always_inline)) void dot(BlockAcc<false>& a, int8x16_t c, int8x16_t x, int lane) {
    int32x4_t r;
    switch (lane) {  // constant after unrolling
      case 0: r = vdupq_laneq_s32(vreinterpretq_s32_s8(x), 0); break;
      case 1: r = vdupq_laneq_s32(vreinterpretq_s32_s8(x), 1); break;
      case 2: r = vdupq_laneq_s32(vreinterpretq_s32_s8(x), 2); break;
      default: r = vdupq_laneq_s32(vreinterpretq_s32_s8(x), 3); break;
    }
    const int8x16_t xr = vreinterpretq_s8_s32(r);
    a.lo = vpadalq_s16(a.lo, vmull_s8(vget_low_s8(c), vget_low_s8(xr)));
    a.hi = vpadalq_s16(a.hi, vmull_high_s8(c, xr));
  }
  static inline int32x4_t finish(const BlockAcc<false>& a) { return vpaddq_s32(a.lo, a.hi); }
};
}  // namespace

void quantize_row(const float* x, int64_t K, int64_t block, int8_t* q, float* d, int32_t* sum) {
  if (block == 8) quantize_row_neon<8>(x, K, q, d, sum);
  else quantize_row_neon<16>(x, K, q, d, sum);
}

int64_t packed_size_int8(const QWeight& w) { return qpack::packed_size(w, kQT); }
int64_t packed_size_int4(const QWeight& w) { return qpack::packed_size(w, kQT); }
int64_t packed_size_nf4(const QWeight& w) { return qpack::packed_size(w, kQT); }
int64_t packed_size_fp4(const QWeight& w) { return qpack::packed_size(w, kQT); }
void pack_int8(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, kQT); }
void pack_int4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, kQT); }
void pack_nf4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, kQT); }
void pack_fp4(const QWeight& w, int64_t n0, int64_t n1, uint8_t* dst) { qpack::pack_tiles(w, n0, n1, dst, kQT); }

void qgemm_int8(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qgemm_neon<MullDot, kInt8>(w, p, x, n0, n1, y, ldy);
}
void qgemm_int4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  qgemm_neon<MullDot, kInt4>(w, p, x, n0, n1, y, ldy);
}
void qgemm_nf4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qgemm_neon<MullDot, kNF4>(w, p, x, n0, n1, y, ldy);
}
void qgemm_fp4(const QWeight& w, const uint8_t* p, const QActs& x, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  qgemm_neon<MullDot, kFP4>(w, p, x, n0, n1, y, ldy);
}

}  // namespace neon
}  // namespace lowbit
