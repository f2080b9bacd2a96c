// Readable scalar matmul: for each output row n, decode one group of weights at a time into a
// small buffer and dot it with every activation row. Correct for any shape; not fast.
#include "kernels/common.h"

namespace lowbit {
namespace generic {
using namespace detail;


static constexpr int64_t kChunk = 256;  // weights decoded per step (a stack buffer)

// Decodes w[n, k0:k1] (k1 - k0 <= kChunk) into buf: the reference's values (dequant.cpp).
static void decode_span(const QWeight& w, int64_t n, int64_t k0, int64_t k1, float* buf) {
  const float* cb = codebook_of(w.fmt);
  const uint8_t* row = w.data + n * w.ld_data;
  int64_t k = k0;
  while (k < k1) {
    const int64_t g = k / w.group;
    const int64_t gend = min64(k1, (g + 1) * w.group);
    const float s = group_scale(w, n, g);
    const int z = group_zero(w, n, g);
    const float m = w.float_offset ? group_offset(w, n, g) : 0.0f;
    for (; k < gend; ++k) {
      if (w.fmt == kInt8) {
        buf[k - k0] = float(int(int8_t(row[k])) - z) * s;
        continue;
      }
      const int q = nibble_at(row, k);
      if (cb) {
        buf[k - k0] = cb[q] * s;
      } else if (w.float_offset) {
        const float t = float(q) * s;
        buf[k - k0] = t + m;
      } else {
        buf[k - k0] = float(q - z) * s;
      }
    }
  }
}

static void gemm_any(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0,
                     int64_t n1, float* y, int64_t ldy) {
  float buf[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = 0.0f;
    for (int64_t k0 = 0; k0 < w.K; k0 += kChunk) {
      const int64_t k1 = min64(w.K, k0 + kChunk);
      decode_span(w, n, k0, k1, buf);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        float acc = 0.0f;
        for (int64_t k = k0; k < k1; ++k) acc += buf[k - k0] * xr[k];
        y[m * ldy + n] += acc;
      }
    }
  }
}

void gemm_int8(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  gemm_any(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_int4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  gemm_any(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_nf4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  gemm_any(w, x, M, ldx, n0, n1, y, ldy);
}
void gemm_fp4(const QWeight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  gemm_any(w, x, M, ldx, n0, n1, y, ldy);
}

}  // namespace generic
}  // namespace lowbit
