// Readable scalar dequantization: the C++ statement of reference.dequantize.
#include "kernels/common.h"

namespace lowbit {
namespace generic {
using namespace detail;

// w = float(q - z) * s per group (z = 0 when symmetric; one group per row by default).
void dequant_int8(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float s = group_scale(w, n, g);
      const int z = group_zero(w, n, g);
      const int64_t k1 = min64(w.K, (g + 1) * w.group);
      for (int64_t k = g * w.group; k < k1; ++k) o[k] = float(int(q[k]) - z) * s;
    }
  }
}

// The 4-bit formats share the nibble walk; only the code -> value map differs:
//   int4: float(q - z) * s;  float offset: float(q) * s + m (two roundings);
//   nf4 / fp4: codebook[q] * absmax.
static void dequant_nibbles(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const float* cb = codebook_of(w.fmt);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * w.ld_data;
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float s = group_scale(w, n, g);
      const int z = group_zero(w, n, g);
      const float m = w.float_offset ? group_offset(w, n, g) : 0.0f;
      const int64_t k1 = min64(w.K, (g + 1) * w.group);
      for (int64_t k = g * w.group; k < k1; ++k) {
        const int q = nibble_at(row, k);
        if (cb) {
          o[k] = cb[q] * s;
        } else if (w.float_offset) {
          const float t = float(q) * s;
          o[k] = t + m;
        } else {
          o[k] = float(q - z) * s;
        }
      }
    }
  }
}

void dequant_int4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  dequant_nibbles(w, n0, n1, out, ldo);
}

void dequant_nf4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  dequant_nibbles(w, n0, n1, out, ldo);
}

void dequant_fp4(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  dequant_nibbles(w, n0, n1, out, ldo);
}

}  // namespace generic
}  // namespace lowbit
