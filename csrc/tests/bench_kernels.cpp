// Benchmark of the CPU kernels through the public C++ API (no Python): lowbit::linear (exact
// path) and lowbit::linear_packed (fast path) for int8 / int4 g128 / nf4 b64 / fp4 b64 weights,
// weights rotated over more than --rotate-mib MiB so the last-level cache does not hold them.
//
// Usage: lowbit_bench [--isa NAME] [--shapes NxK,...] [--m 1,8,32,128] [--threads 1,2]
//                     [--formats int8,int4,nf4,fp4] [--paths fast,exact] [--xdtype f32|bf16]
//                     [--rotate-mib 320] [--reps 30] [--max-seconds 2] [--stream]
// Prints one line per case: the median time per call, GB/s over the format's own bytes
// (codes + scales + zeros, what the weight occupies, not the packed copy) and GFLOP/s.
// --stream adds, per fast-path case, a plain streaming read of the same packed buffers on the
// same thread pool and the same split into tasks ("read" lines, and the kernel's fraction of
// it): the bandwidth a memory-bound kernel can reach on this machine.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "api.h"
#include "dispatch.h"
#include "threadpool.h"

using namespace lowbit;

namespace {

struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(double(next() >> 11) * 0x1.0p-53); }
};

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    v.push_back(std::atoll(s.substr(i, j - i).c_str()));
    i = j + 1;
  }
  return v;
}

std::vector<std::string> parse_names(const std::string& s) {
  std::vector<std::string> v;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    v.push_back(s.substr(i, j - i));
    i = j + 1;
  }
  return v;
}

// One weight's tensors (a copy for rotation).
struct WeightCopy {
  std::vector<uint8_t> data, zeros;
  std::vector<float> scales;
  std::vector<uint8_t> packed;
  QWeight w{};
};

void make_weight(WeightCopy& c, Format fmt, int64_t N, int64_t K, Rng& rng) {
  QWeight& w = c.w;
  w.fmt = fmt;
  w.N = N;
  w.K = K;
  w.group = fmt == kInt8 ? K : fmt == kInt4 ? 128 : 64;
  w.n_groups = (K + w.group - 1) / w.group;
  w.symmetric = fmt != kInt4;
  w.ld_data = fmt == kInt8 ? K : (K + 1) / 2;
  c.data.resize(size_t(N * w.ld_data));
  for (auto& b : c.data) b = uint8_t(rng.next());
  if (fmt == kInt8)
    for (auto& b : c.data) b = b == 0x80 ? 0x81 : b;  // int8 codes are within [-127, 127]
  c.scales.resize(size_t(N * w.n_groups));
  for (auto& s : c.scales) s = rng.uniform(1e-3f, 2e-2f);
  if (fmt == kInt4) {
    c.zeros.resize(size_t(N * w.n_groups));
    for (auto& z : c.zeros) z = uint8_t(rng.next() % 16);
  }
  w.data = c.data.data();
  w.scales = c.scales.data();
  w.zeros = c.zeros.empty() ? nullptr : c.zeros.data();
}

// The packed form inside c.packed (allocated 64 bytes larger), at a 64-byte boundary.
uint8_t* packed_at(const WeightCopy& c) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(c.packed.data());
  return const_cast<uint8_t*>(c.packed.data()) + ((64 - a % 64) % 64);
}

int64_t format_bytes(const WeightCopy& c) {
  return int64_t(c.data.size() + c.zeros.size() + c.scales.size() * 4);
}

// Sums the 8-byte words of [p, p + n) (n a multiple of 64): a streaming read that the
// compiler vectorizes; the result is kept so that the loads are not optimized away.
#if defined(__x86_64__)
__attribute__((target("avx2")))
#endif
uint64_t read_sum(const uint8_t* p, int64_t n) {
  uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      s[j] += v;
    }
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

// The bytes of `buf` read in `tasks` contiguous pieces on `nt` threads (like the kernel's tasks).
uint64_t stream_read(const uint8_t* buf, int64_t bytes, int64_t tasks, int nt) {
  const int64_t per = (bytes / tasks) / 64 * 64;
  std::vector<uint64_t> part(size_t(tasks), 0);
  parallel_for(tasks, nt, [&](int64_t i) {
    const int64_t b0 = i * per, b1 = i + 1 == tasks ? bytes / 64 * 64 : b0 + per;
    part[size_t(i)] = read_sum(buf + b0, b1 - b0);
  });
  uint64_t s = 0;
  for (uint64_t v : part) s += v;
  return s;
}

// The task count of api.cpp's for_row_tiles for N rows on nt threads (rows_per_task).
int64_t row_tasks(int64_t N, int nt) {
  const int64_t target = (N + int64_t(nt) * 4 - 1) / (int64_t(nt) * 4);
  const int64_t t = std::min<int64_t>(std::max<int64_t>(16, (target + 15) / 16 * 16), 256);
  return (N + t - 1) / t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string isa, xdtype = "f32";
  std::vector<int64_t> Ms = {1, 8, 32, 128}, threads = {1, 2};
  std::vector<std::string> shapes = {"4096x4096", "4096x11008"}, formats = {"int8", "int4", "nf4"},
                           paths = {"fast", "exact"};
  int64_t rotate_mib = 320, reps = 30;
  double max_seconds = 2.0;
  bool stream = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const std::string v = i + 1 < argc ? argv[i + 1] : "";
    if (a == "--stream") {
      stream = true;
      continue;
    }
    if (a == "--isa") isa = v;
    else if (a == "--shapes") shapes = parse_names(v);
    else if (a == "--m") Ms = parse_list(v);
    else if (a == "--threads") threads = parse_list(v);
    else if (a == "--formats") formats = parse_names(v);
    else if (a == "--paths") paths = parse_names(v);
    else if (a == "--xdtype") xdtype = v;
    else if (a == "--rotate-mib") rotate_mib = std::atoll(v.c_str());
    else if (a == "--reps") reps = std::atoll(v.c_str());
    else if (a == "--max-seconds") max_seconds = std::atof(v.c_str());
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
    ++i;
  }
  const KernelTable& tab = isa.empty() ? active_table() : table_for(isa);
  const DType xdt = xdtype == "bf16" ? kBF16 : kF32;
  std::printf("# isa %s, activations %s, weights rotated over >= %lld MiB\n", tab.isa, xdtype.c_str(),
              (long long)rotate_mib);
  std::printf("%-6s %-5s %6s %6s %4s %2s %10s %8s %9s %10s\n", "fmt", "path", "N", "K", "M", "T", "ms", "GB/s",
              "GFLOP/s", "min ms");
  Rng rng{42};
  for (const std::string& shape : shapes) {
    const int64_t N = std::atoll(shape.c_str()), K = std::atoll(shape.c_str() + shape.find('x') + 1);
    for (const std::string& fname : formats) {
      int f = 0;
      while (f < kNumFormats && fname != kFormatTraits[f].name) ++f;
      if (f == kNumFormats) {
        std::fprintf(stderr, "unknown format %s\n", fname.c_str());
        return 2;
      }
      const Format fmt = Format(f);
      WeightCopy first;
      make_weight(first, fmt, N, K, rng);
      const int64_t bytes = format_bytes(first);
      const int64_t copies = std::max<int64_t>(2, (rotate_mib << 20) / bytes + 1);
      std::vector<WeightCopy> ws(static_cast<size_t>(copies));
      for (int64_t c = 0; c < copies; ++c) {
        WeightCopy& wc = ws[size_t(c)];
        wc.data = first.data;
        wc.scales = first.scales;
        wc.zeros = first.zeros;
        wc.w = first.w;
        wc.w.data = wc.data.data();
        wc.w.scales = wc.scales.data();
        wc.w.zeros = wc.zeros.empty() ? nullptr : wc.zeros.data();
      }
      for (const std::string& path : paths) {
        const bool fast = path == "fast";
        int64_t psize = 0;
        if (fast) {
          psize = packed_size(first.w, &tab);
          if (psize == 0) continue;
          // 64-byte aligned, as torch's allocator gives the Python side (packed_at)
          ws[0].packed.resize(size_t(psize + 64));
          pack_weight(ws[0].w, packed_at(ws[0]), psize, 2, &tab);
          for (int64_t c = 1; c < copies; ++c) {
            ws[size_t(c)].packed.resize(size_t(psize + 64));
            std::memcpy(packed_at(ws[size_t(c)]), packed_at(ws[0]), size_t(psize));
          }
        }
        for (int64_t M : Ms) {
          std::vector<float> xf(static_cast<size_t>(M * K));
          for (auto& v : xf) v = rng.uniform(-1.0f, 1.0f);
          std::vector<uint16_t> xh(static_cast<size_t>(M * K));
          tab.from_f32[kBF16](xf.data(), xh.data(), M * K);
          std::vector<float> y(static_cast<size_t>(M * N));
          for (int64_t nt : threads) {
            LinearArgs a{};
            a.x = xdt == kF32 ? static_cast<const void*>(xf.data()) : static_cast<const void*>(xh.data());
            a.x_dtype = xdt;
            a.M = M;
            a.ldx = K;
            a.y = y.data();
            a.y_dtype = kF32;
            a.ldy = N;
            a.n_threads = int(nt);
            std::vector<double> ts;
            const auto start = std::chrono::steady_clock::now();
            for (int64_t r = 0; r < reps + 2; ++r) {
              const WeightCopy& wc = ws[size_t(r % copies)];
              a.w = wc.w;
              const auto t0 = std::chrono::steady_clock::now();
              if (fast) linear_packed(a, packed_at(wc), psize, &tab);
              else linear(a, &tab);
              const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
              if (r >= 2) ts.push_back(dt.count());
              const std::chrono::duration<double> total = std::chrono::steady_clock::now() - start;
              if (r >= 4 && total.count() > max_seconds) break;
            }
            const double t = median(ts);
            const double tmin = *std::min_element(ts.begin(), ts.end());
            std::printf("%-6s %-5s %6lld %6lld %4lld %2lld %10.4f %8.2f %9.1f %10.4f\n", fname.c_str(), path.c_str(),
                        (long long)N, (long long)K, (long long)M, (long long)nt, t * 1e3, double(bytes) / t / 1e9,
                        2.0 * double(M * N * K) / t / 1e9, tmin * 1e3);
            if (fast && stream) {
              std::vector<double> rs;
              uint64_t keep = 0;
              const int64_t tasks = row_tasks(N, threads_for(M, N, K, int(nt)));
              for (int64_t r = 0; r < reps + 2; ++r) {
                const WeightCopy& wc = ws[size_t(r % copies)];
                const auto t0 = std::chrono::steady_clock::now();
                keep += stream_read(packed_at(wc), psize, tasks, int(nt));
                const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
                if (r >= 2) rs.push_back(dt.count());
              }
              const double tr = median(rs);
              std::printf("%-6s %-5s %6lld %6lld %4lld %2lld %10.4f %8.2f   (read of the packed bytes; kernel at %.0f%%)%s\n",
                          fname.c_str(), "read", (long long)N, (long long)K, (long long)M, (long long)nt,
                          tr * 1e3, double(psize) / tr / 1e9, 100.0 * tr / t, keep == 1 ? " " : "");
            }
            std::fflush(stdout);
          }
        }
      }
    }
  }
  return 0;
}
