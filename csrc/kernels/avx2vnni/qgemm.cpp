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

LOWBIT_QX86_QGEMM_ENTRIES(V)

}  // namespace avx2vnni
}  // namespace lowbit
