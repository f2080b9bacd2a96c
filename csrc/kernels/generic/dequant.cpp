// Readable scalar dequantization: the C++ statement of reference.dequantize.
#include "kernels/common.h"

namespace lowbit {
namespace generic {
using namespace detail;

void dequant_int8(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.data + n * w.ld_data);
    const float s = static_cast<const float*>(w.scales)[n];
    float* o = out + (n - n0) * ldo;
    for (int64_t k = 0; k < w.K; ++k) o[k] = float(q[k]) * s;
  }
}

// int4 and nf4 share the nibble walk; only the code -> value map differs.
static void dequant_nibbles(const QWeight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * w.ld_data;
    float* o = out + (n - n0) * ldo;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float s = group_scale(w, n, g);
      const int z = group_zero(w, n, g);
      const int64_t k1 = min64(w.K, (g + 1) * w.group);
      for (int64_t k = g * w.group; k < k1; ++k) {
        const int q = nibble_at(row, k);
        o[k] = (w.fmt == kNF4) ? kNF4Codebook[q] * s : float(q - z) * s;
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

}  // namespace generic
}  // namespace lowbit
