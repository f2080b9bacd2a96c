// Chooses one KernelTable per process: the best ISA this CPU supports, or the one named by
// LOWBIT_ISA (scalar | avx2 | avx2vnni | avx512 | avx512vnni | avx512amx | neon | neon_dotprod). Probed once, on first use.
#pragma once
#include <string>
#include <vector>

#include "kernel_api.h"

namespace lowbit {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx_vnni = false;  // AVX-VNNI: the VEX-encoded (256-bit) vpdpbusd
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false;
  // AMX-TILE and AMX-BF16 present, their state enabled in XCR0 and granted to this process by
  // the OS (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked for once by the probe).
  bool amx_bf16 = false;
  bool neon = false, dotprod = false;
};

const CpuFeatures& cpu_features();

// The table in use. Throws std::runtime_error if LOWBIT_ISA names an ISA this CPU or build
// can't run.
const KernelTable& active_table();

// The table of a named ISA, for tests and benchmarks; throws std::runtime_error (naming the
// missing CPU feature) if it can't run here.
const KernelTable& table_for(const std::string& isa);

// Makes `isa` the active table (throws as table_for does).
void set_active_isa(const std::string& isa);

// Why the active table was chosen ("LOWBIT_ISA=avx2", "best supported: ...").
std::string active_reason();

// ISAs compiled into this build, and the subset this CPU can run.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();

}  // namespace lowbit
