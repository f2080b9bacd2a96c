// The avx512vnni KernelTable: avx512's kernels (exact path, activation quantizer, packed layout)
// with the fast path's qgemm using vpdpbusd. Chosen by dispatch only where the CPU has
// AVX512_VNNI; the plain avx512 table keeps running on AVX-512 CPUs without it.
#include "kernels/avx512/table_functions.h"

namespace lowbit {

namespace avx512vnni {

const KernelTable kTable = {
    "avx512vnni",
    {avx512::dequant_int8, avx512::dequant_int4, avx512::dequant_nf4, avx512::dequant_fp4},
    {avx512::gemm_int8, avx512::gemm_int4, avx512::gemm_nf4, avx512::gemm_fp4},
    {avx512::f32_to_f32, avx512::bf16_to_f32v, avx512::f16_to_f32v},
    {avx512::f32_from_f32, avx512::f32_to_bf16v, avx512::f32_to_f16v},
    16,  // qtile: rows per packed tile (avx512's layout)
    avx512::quantize_row,
    // fast path (every format; packed_size() reports 0 for the weights it does not take)
    {avx512::packed_size_int8, avx512::packed_size_int4, avx512::packed_size_nf4, avx512::packed_size_fp4},
    {avx512::pack_int8, avx512::pack_int4, avx512::pack_nf4, avx512::pack_fp4},
    {qgemm_int8, qgemm_int4, qgemm_nf4, qgemm_fp4},
    {0, 0, 0, 0}, nullptr, {nullptr, nullptr, nullptr, nullptr},  // no tile path
};

}  // namespace avx512vnni
}  // namespace lowbit
