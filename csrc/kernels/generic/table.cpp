#include "kernel_api.h"

namespace lowbit {
namespace generic {

LOWBIT_DECLARE_KERNEL_FUNCTIONS()
LOWBIT_DECLARE_QGEMM_FUNCTIONS()

const KernelTable kTable = {
    "scalar",
    {dequant_int8, dequant_int4, dequant_nf4, dequant_fp4},
    {gemm_int8, gemm_int4, gemm_nf4, gemm_fp4},
    {f32_to_f32, bf16_to_f32v, f16_to_f32v},
    {f32_from_f32, f32_to_bf16v, f32_to_f16v},
    1,  // qtile: rows per packed tile
    quantize_row,
    // fast path (every format; packed_size() reports 0 for the weights it does not take)
    {packed_size_int8, packed_size_int4, packed_size_nf4, packed_size_fp4},
    {pack_int8, pack_int4, pack_nf4, pack_fp4},
    {qgemm_int8, qgemm_int4, qgemm_nf4, qgemm_fp4},
    {0, 0, 0, 0}, nullptr, {nullptr, nullptr, nullptr, nullptr},  // no tile path
};

}  // namespace generic
}  // namespace lowbit
