// AVX-512 VNNI fast path: the kernel of kernels/qgemm_x86.h with vpdpbusd (u8 x s8 summed
// straight into int32). Same packed layout and activation quantizer as avx512 (its table uses
// avx512's pack and quantize_row).
#include "kernels/avx512/qvec.h"

namespace lowbit {
namespace avx512vnni {
using namespace detail;
using V = V512<true>;

LOWBIT_QX86_QGEMM_ENTRIES(V)

}  // namespace avx512vnni
}  // namespace lowbit
