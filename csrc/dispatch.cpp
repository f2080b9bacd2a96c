#include "dispatch.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <cpuid.h>
#define LOWBIT_X86 1
#endif
#if defined(LOWBIT_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#if defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace lowbit {
namespace {

#ifdef LOWBIT_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

#ifdef LOWBIT_X86
// Linux gives a process the (8 KiB) tile state only on request; without it the first tile
// instruction faults. Asked once, process-wide.
bool amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

CpuFeatures probe() {
  CpuFeatures f;
#ifdef LOWBIT_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  // The OS must save the wide registers, or the instructions fault even if CPUID lists them.
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool ymm_ok = (xcr0 & 0x6) == 0x6;
  const bool zmm_ok = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = ymm_ok && (b & (1u << 5));
    f.avx512f = zmm_ok && (b & (1u << 16));
    f.avx512dq = zmm_ok && (b & (1u << 17));
    f.avx512bw = zmm_ok && (b & (1u << 30));
    f.avx512vl = zmm_ok && (b & (1u << 31));
    f.avx512vnni = zmm_ok && (c & (1u << 11));
    // AMX: CPUID.7.0:EDX bit 22 AMX-BF16, bit 24 AMX-TILE; XCR0 bits 17-18 (XTILECFG, XTILEDATA)
    const bool amx_cpu = (d & (1u << 22)) && (d & (1u << 24)) && (xcr0 & 0x60000) == 0x60000;
    f.amx_bf16 = amx_cpu && amx_permission();
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    f.avx_vnni = ymm_ok && (a & (1u << 4));  // CPUID.(7,1):EAX bit 4
    f.avx512bf16 = zmm_ok && (a & (1u << 5));
  }
  if (!ymm_ok) f.fma = f.f16c = f.avx_vnni = false;
#endif
#if defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory on AArch64
#if defined(__linux__)
  f.dotprod = getauxval(AT_HWCAP) & HWCAP_ASIMDDP;
#elif defined(__APPLE__)
  int v = 0;
  size_t len = sizeof(v);
  if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, nullptr, 0) == 0) f.dotprod = v;
#endif
#endif
  return f;
}

struct IsaEntry {
  const char* name;
  const KernelTable* table;  // nullptr: not compiled into this build
  // Empty when the CPU can run it, else the missing feature's name.
  std::string (*missing)(const CpuFeatures&);
};

std::string avx2_missing(const CpuFeatures& f) {
  if (!f.avx2) return "avx2";
  if (!f.fma) return "fma";
  if (!f.f16c) return "f16c";
  return "";
}

std::string avx512_missing(const CpuFeatures& f) {
  if (!f.avx512f) return "avx512f";
  if (!f.avx512bw) return "avx512bw";
  if (!f.avx512vl) return "avx512vl";
  if (!f.avx512dq) return "avx512dq";
  if (!(f.avx2 && f.fma && f.f16c)) return "avx2/fma/f16c";
  return "";
}

std::string avx512vnni_missing(const CpuFeatures& f) {
  const std::string m = avx512_missing(f);
  if (!m.empty()) return m;
  return f.avx512vnni ? "" : "avx512vnni";
}

const IsaEntry kIsas[] = {
    // best first
    {"avx512amx",
#ifdef LOWBIT_HAVE_AVX512AMX
     &avx512amx::kTable,
#else
     nullptr,
#endif
     [](const CpuFeatures& f) -> std::string {
       const std::string m = avx512vnni_missing(f);
       if (!m.empty()) return m;
       if (!f.avx512bf16) return "avx512bf16";
       return f.amx_bf16 ? "" : "amx-bf16 (with the OS's tile state)";
     }},
    {"avx512vnni",
#ifdef LOWBIT_HAVE_AVX512VNNI
     &avx512vnni::kTable,
#else
     nullptr,
#endif
     avx512vnni_missing},
    {"avx512",
#ifdef LOWBIT_HAVE_AVX512
     &avx512::kTable,
#else
     nullptr,
#endif
     avx512_missing},
    {"avx2vnni",
#ifdef LOWBIT_HAVE_AVX2VNNI
     &avx2vnni::kTable,
#else
     nullptr,
#endif
     [](const CpuFeatures& f) -> std::string {
       const std::string m = avx2_missing(f);
       if (!m.empty()) return m;
       return f.avx_vnni ? "" : "avx-vnni";
     }},
    {"avx2",
#ifdef LOWBIT_HAVE_AVX2
     &avx2::kTable,
#else
     nullptr,
#endif
     avx2_missing},
    {"neon_dotprod",
#ifdef LOWBIT_HAVE_NEON_DOTPROD
     &neon_dotprod::kTable,
#else
     nullptr,
#endif
     [](const CpuFeatures& f) -> std::string { return !f.neon ? "neon" : f.dotprod ? "" : "dotprod"; }},
    {"neon",
#ifdef LOWBIT_HAVE_NEON
     &neon::kTable,
#else
     nullptr,
#endif
     [](const CpuFeatures& f) -> std::string { return f.neon ? "" : "neon"; }},
    {"scalar", &generic::kTable, [](const CpuFeatures&) -> std::string { return ""; }},
};

std::mutex g_mu;
const KernelTable* g_active = nullptr;
std::string g_reason;

const KernelTable& lookup(const std::string& isa) {
  for (const auto& e : kIsas) {
    if (isa != e.name) continue;
    if (!e.table) throw std::runtime_error("ISA '" + isa + "' is not compiled into this build of lowbit");
    const std::string miss = e.missing(cpu_features());
    if (!miss.empty())
      throw std::runtime_error("ISA '" + isa + "' needs the CPU feature '" + miss +
                               "', which this CPU (or OS) does not provide");
    return *e.table;
  }
  throw std::runtime_error("unknown ISA '" + isa + "' (expected one of: avx512amx, avx512vnni, avx512, avx2vnni, avx2, neon_dotprod, neon, scalar)");
}

void choose_locked() {
  if (g_active) return;
  const char* env = std::getenv("LOWBIT_ISA");
  if (env && *env) {
    g_active = &lookup(env);
    g_reason = std::string("forced by LOWBIT_ISA=") + env;
    return;
  }
  for (const auto& e : kIsas) {
    if (e.table && e.missing(cpu_features()).empty()) {
      g_active = e.table;
      g_reason = std::string("best ISA supported by this CPU and build");
      return;
    }
  }
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = probe();
  return f;
}

const KernelTable& active_table() {
  std::lock_guard<std::mutex> lk(g_mu);
  choose_locked();
  return *g_active;
}

const KernelTable& table_for(const std::string& isa) { return lookup(isa); }

void set_active_isa(const std::string& isa) {
  const KernelTable& t = lookup(isa);
  std::lock_guard<std::mutex> lk(g_mu);
  g_active = &t;
  g_reason = "set by lowbit.set_isa('" + isa + "')";
}

std::string active_reason() {
  std::lock_guard<std::mutex> lk(g_mu);
  choose_locked();
  return g_reason;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> v;
  for (const auto& e : kIsas)
    if (e.table) v.push_back(e.name);
  return v;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> v;
  for (const auto& e : kIsas)
    if (e.table && e.missing(cpu_features()).empty()) v.push_back(e.name);
  return v;
}

}  // namespace lowbit
