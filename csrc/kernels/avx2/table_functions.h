// The functions of the avx2 kernels (and avx2vnni's qgemm) that the avx2 and avx2vnni
// KernelTables list (each table.cpp includes this; the definitions are in the folders' other
// files, compiled with their own flags).
#pragma once
#include "kernel_api.h"

namespace lowbit {
namespace avx2 {

LOWBIT_DECLARE_KERNEL_FUNCTIONS()
LOWBIT_DECLARE_QGEMM_FUNCTIONS()

}  // namespace avx2

namespace avx2vnni {

LOWBIT_DECLARE_QGEMM_FUNCTIONS()

}  // namespace avx2vnni
}  // namespace lowbit
