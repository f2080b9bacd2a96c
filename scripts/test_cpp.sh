#!/usr/bin/env bash
# Builds the C++ kernel library + tests natively (build/cpp-tests) and runs them over every
# ISA this CPU supports.
#
#   scripts/test_cpp.sh [test args, e.g. --quick, --isa avx2]
#
# Environment: SANITIZE=1 builds with ASan+UBSan (build/cpp-tests-asan);
#              VALGRIND=1 runs the binary under valgrind memcheck (use with --quick); invalid
#              accesses, uninitialised reads and definite leaks fail the run;
#              TEST_TIMEOUT (seconds, default 1800) stops a run that hangs.
# Quiet on success: the ISA lines and the summary; on failure, the tail of the log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${SANITIZE:-0}" == 1 ]]; then
  BUILD=$ROOT/build/cpp-tests-asan
  SAN=ON
else
  BUILD=$ROOT/build/cpp-tests
  SAN=OFF
fi
fail() { echo "test_cpp: $*" >&2; exit 1; }

mkdir -p "$BUILD"
LOG=$BUILD/test_cpp.log
: >"$LOG"
gen=()
if [[ ! -f $BUILD/CMakeCache.txt ]] && command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
if ! cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DLOWBIT_BUILD_PYTHON=OFF -DLOWBIT_BUILD_TESTS=ON -DLOWBIT_SANITIZE=$SAN >>"$LOG" 2>&1; then
  tail -30 "$LOG" >&2
  fail "cmake configure failed (log: $LOG)"
fi
if ! cmake --build "$BUILD" --target lowbit_kernel_tests -j "$(nproc 2>/dev/null || echo 2)" >>"$LOG" 2>&1; then
  grep -E 'error|Error' "$LOG" | head -30 >&2 || tail -30 "$LOG" >&2
  fail "build failed (log: $LOG)"
fi

runner=()
[[ "${VALGRIND:-0}" == 1 ]] && runner=(valgrind -q --error-exitcode=3 --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite)
out=$BUILD/test_cpp.out
rc=0
timeout "${TEST_TIMEOUT:-1800}" "${runner[@]}" "$BUILD/lowbit_kernel_tests" "$@" >"$out" 2>&1 || rc=$?
[[ $rc == 124 ]] && echo "test_cpp: no result within ${TEST_TIMEOUT:-1800} s (a hang?)" >&2
compiled=$(sed -n 's/^compiled ISAs: //p' "$out")
supported=$(sed -n 's/^supported ISAs: //p' "$out")
echo "native $(uname -m): compiled ISAs [$compiled], supported ISAs [$supported]: $(tail -n 1 "$out")"
if [[ $rc != 0 ]]; then
  grep -E '^FAIL|ERROR|runtime error|==[0-9]+==' "$out" | head -20 >&2 || tail -20 "$out" >&2
  fail "exit status $rc (full output: $out)"
fi
