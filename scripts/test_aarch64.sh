#!/usr/bin/env bash
# Cross-builds the C++ kernel library + tests for AArch64 and runs them under qemu-user on
# two CPU models: cortex-a53 (plain armv8-a NEON, no dotprod) and max (dotprod and more).
#
#   scripts/test_aarch64.sh [test args, e.g. --quick]
#
# Environment: SANITIZE=1 builds with ASan+UBSan (build/aarch64-asan);
#              QEMU_CPUS="cortex-a53 max" picks the CPU models;
#              TEST_TIMEOUT (seconds, default 1200) stops a run per CPU that hangs.
# Installs g++-aarch64-linux-gnu and qemu-user if missing. Quiet on success: one summary
# line per CPU; on failure, the tail of the log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SYSROOT=/usr/aarch64-linux-gnu
CPUS=${QEMU_CPUS:-cortex-a53 max}
if [[ "${SANITIZE:-0}" == 1 ]]; then
  BUILD=$ROOT/build/aarch64-asan
  SAN=ON
else
  BUILD=$ROOT/build/aarch64
  SAN=OFF
fi

fail() { echo "test_aarch64: $*" >&2; exit 1; }

# ---- tools -------------------------------------------------------------------------------
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if ((${#missing[@]})); then
  SUDO=
  if [[ $(id -u) != 0 ]]; then command -v sudo >/dev/null 2>&1 && SUDO=sudo || fail "need root to install ${missing[*]}"; fi
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if ! $SUDO apt-get install -y "${missing[@]}" >"$log" 2>&1; then
    if ! { $SUDO apt-get update && $SUDO apt-get install -y "${missing[@]}"; } >>"$log" 2>&1; then
      tail -20 "$log" >&2
      fail "could not install ${missing[*]}"
    fi
  fi
  rm -f "$log"
fi

# ---- configure + build ---------------------------------------------------------------------
mkdir -p "$BUILD"
LOG=$BUILD/test_aarch64.log
: >"$LOG"
gen=()
if [[ ! -f $BUILD/CMakeCache.txt ]] && command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
if ! cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" \
    -DCMAKE_TOOLCHAIN_FILE="$ROOT/scripts/aarch64-toolchain.cmake" \
    -DCMAKE_BUILD_TYPE=Release -DLOWBIT_BUILD_PYTHON=OFF -DLOWBIT_BUILD_TESTS=ON \
    -DLOWBIT_SANITIZE=$SAN >>"$LOG" 2>&1; then
  tail -30 "$LOG" >&2
  fail "cmake configure failed (log: $LOG)"
fi
if ! cmake --build "$BUILD" --target lowbit_kernel_tests -j "$(nproc 2>/dev/null || echo 2)" >>"$LOG" 2>&1; then
  grep -E 'error|Error' "$LOG" | head -30 >&2 || tail -30 "$LOG" >&2
  fail "build failed (log: $LOG)"
fi
BIN=$BUILD/lowbit_kernel_tests

# ---- run ---------------------------------------------------------------------------------
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}  # LeakSanitizer does not work under qemu-user
status=0
for cpu in $CPUS; do
  out=$BUILD/test_aarch64.$cpu.out
  rc=0
  timeout "${TEST_TIMEOUT:-1200}" qemu-aarch64 -L "$SYSROOT" -cpu "$cpu" "$BIN" "$@" >"$out" 2>&1 || rc=$?
  if [[ $rc == 124 ]]; then
    echo "aarch64 qemu -cpu $cpu: no result within ${TEST_TIMEOUT:-1200} s (a hang?); last lines:" >&2
    tail -5 "$out" >&2
  fi
  compiled=$(sed -n 's/^compiled ISAs: //p' "$out")
  supported=$(sed -n 's/^supported ISAs: //p' "$out")
  dotprod=$(grep -o 'dotprod=[01]' "$out" | head -1 || true)
  summary=$(tail -n 1 "$out")
  tested=" $(sed -n 's/^testing ISAs: //p' "$out" | sed 's/ (quick)//') "
  echo "aarch64 qemu -cpu $cpu: compiled ISAs [$compiled], supported ISAs [$supported], $dotprod: $summary"
  # The CPU models must exercise what they stand for: plain NEON without dotprod on cortex-a53,
  # the dotprod kernels on max (a qemu that stopped reporting dotprod would otherwise pass
  # silently with the plain NEON kernels only).
  case $cpu in
    cortex-a53) [[ $tested == *" neon "* && $tested != *" neon_dotprod "* ]] || {
                  echo "  -cpu cortex-a53 should test plain NEON without dotprod; tested:$tested" >&2; rc=$((rc == 0 ? 4 : rc)); } ;;
    max) [[ $tested == *" neon_dotprod "* && $tested == *" neon "* ]] || {
           echo "  -cpu max should test neon_dotprod and neon; tested:$tested" >&2; rc=$((rc == 0 ? 4 : rc)); } ;;
  esac
  if [[ $rc != 0 ]]; then
    status=1
    grep -E '^FAIL|ERROR|runtime error' "$out" | head -20 >&2 || tail -20 "$out" >&2
    echo "  (exit status $rc; full output: $out)" >&2
  fi
done
exit $status
