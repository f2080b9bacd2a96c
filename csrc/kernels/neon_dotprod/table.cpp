// The neon_dotprod KernelTable: neon's kernels (exact path, activation quantizer, packed
// layout) with the fast path's qgemm using sdot (armv8.2-a dotprod). Chosen by dispatch only
// where the CPU reports it (HWCAP_ASIMDDP); the plain neon table runs everywhere else.
#include "kernel_api.h"

namespace lowbit {
namespace neon {
LOWBIT_DECLARE_KERNEL_FUNCTIONS()
}  // namespace neon

namespace neon_dotprod {

LOWBIT_DECLARE_QGEMM_FUNCTIONS()

const KernelTable kTable = {
    "neon_dotprod",
    {neon::dequant_int8, neon::dequant_int4, neon::dequant_nf4, neon::dequant_fp4},
    {neon::gemm_int8, neon::gemm_int4, neon::gemm_nf4, neon::gemm_fp4},
    {neon::f32_to_f32, neon::bf16_to_f32v, neon::f16_to_f32v},
    {neon::f32_from_f32, neon::f32_to_bf16v, neon::f32_to_f16v},
    4,  // qtile: rows per packed tile (neon's layout)
    neon::quantize_row,
    // fast path (every format; packed_size() reports 0 for the weights it does not take)
    {neon::packed_size_int8, neon::packed_size_int4, neon::packed_size_nf4, neon::packed_size_fp4},
    {neon::pack_int8, neon::pack_int4, neon::pack_nf4, neon::pack_fp4},
    {qgemm_int8, qgemm_int4, qgemm_nf4, qgemm_fp4},
    {0, 0, 0, 0}, nullptr, {nullptr, nullptr, nullptr, nullptr},  // no tile path
};

}  // namespace neon_dotprod
}  // namespace lowbit
