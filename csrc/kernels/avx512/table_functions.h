// The functions of the avx512 kernels (and avx512vnni's qgemm) that the avx512, avx512vnni and
// avx512amx KernelTables list (each table.cpp includes this; the definitions are in the
// folders' other files, compiled with their own flags).
#pragma once
#include "kernel_api.h"

namespace lowbit {
namespace avx512 {

LOWBIT_DECLARE_KERNEL_FUNCTIONS()
LOWBIT_DECLARE_QGEMM_FUNCTIONS()

}  // namespace avx512

namespace avx512vnni {

LOWBIT_DECLARE_QGEMM_FUNCTIONS()

}  // namespace avx512vnni
}  // namespace lowbit
