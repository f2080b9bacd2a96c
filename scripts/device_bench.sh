#!/usr/bin/env bash
# Builds the plain C++ kernel library + tests + benchmark (no Python module), runs the tests on
# every ISA the CPU supports, then times the fast path on 1 and 2 cores (pinned) next to torch's
# fp32 F.linear and dynamic int8 (fbgemm) baselines and the streaming read bandwidth.
# For a machine where only the C++ side can be built (e.g. the lent GPU machine's host CPU).
#
#   scripts/device_bench.sh OUTDIR [quick]
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-/tmp/lowbit-device}
MODE=${2:-full}
mkdir -p "$OUT"
BUILD=$ROOT/build/device
{ lscpu | grep -E "Model name|^CPU\(s\)|L3"; grep -o -w 'avx512[a-z_0-9]*\|amx[a-z_0-9]*\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; } >"$OUT/cpu.txt"
cat "$OUT/cpu.txt"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWBIT_BUILD_PYTHON=OFF \
  -DLOWBIT_BUILD_TESTS=ON >"$OUT/build.log" 2>&1 && cmake --build "$BUILD" -j 16 >>"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
grep -iE "warning" "$OUT/build.log" | head -5
"$BUILD/lowbit_kernel_tests" >"$OUT/tests.out" 2>&1
echo "tests: rc=$? $(grep -E '^(supported|testing|fast path)' "$OUT/tests.out" | tr '\n' ' ') $(tail -1 "$OUT/tests.out")"
grep -E "^FAIL" "$OUT/tests.out" | head -20

B=$BUILD/lowbit_bench
PIN="taskset -c 2,3"
[[ $(nproc) -lt 4 ]] && PIN="taskset -c 0,1"
V=${ISA_VNNI:-avx512vnni}
P=${ISA_PLAIN:-avx512}
if [[ $MODE == quick ]]; then
  $PIN $B --isa $V --shapes 4096x4096 --m 1,32 --threads 2 --paths fast --reps 10 --max-seconds 0.5 | tee "$OUT/bench_vnni.txt"
  exit 0
fi
R="--reps 10 --max-seconds 0.4"
{
  $PIN $B --isa $V --shapes 4096x4096 --m 1,8,32,128 --threads 1,2 --paths fast $R
  $PIN $B --isa $V --shapes 4096x11008 --m 1,8,32,128 --threads 2 --paths fast $R
  $PIN $B --isa $V --shapes 4096x4096 --m 1 --threads 2 --paths fast --xdtype bf16 $R
  $PIN $B --isa $V --shapes 4096x4096 --m 1,32 --threads 2 --paths exact $R
  $PIN $B --isa $P --shapes 4096x4096 --m 1,32,128 --threads 2 --paths fast $R
  $PIN $B --isa avx2 --shapes 4096x4096 --m 1,32,128 --threads 2 --paths fast $R
} 2>&1 | tee "$OUT/bench_lowbit.txt"
if python3 -c "import torch" 2>/dev/null; then
  {
    $PIN python3 "$ROOT/scripts/bench_fast_path.py" --torch-only --shapes 4096x4096 --m 1,8,32,128 \
      --threads 1,2 --reps 8 --max-seconds 0.8
    $PIN python3 "$ROOT/scripts/bench_fast_path.py" --torch-only --shapes 4096x11008 --m 1,8,32,128 \
      --threads 2 --reps 8 --max-seconds 0.8 --no-bandwidth
  } 2>&1 | grep -v -i warn | grep -v "qweight = " | tee "$OUT/bench_torch.txt"
fi
