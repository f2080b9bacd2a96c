#!/usr/bin/env bash
# Memory-safety checks (`make sanitize`):
#   1. the C++ kernel tests built with AddressSanitizer + UndefinedBehaviorSanitizer
#      (scripts/test_cpp.sh with SANITIZE=1: build/cpp-tests-asan);
#   2. the C++ kernel tests of the plain build under valgrind memcheck (--quick shapes);
#   3. the Python test suite's CPU part against lowbit._C built with ASan + UBSan, in its own
#      environment (build/asan-venv: the project's .venv packages, this build of lowbit), run
#      with the ASan runtime preloaded into the (uninstrumented) Python interpreter.
#
#   scripts/sanitize.sh [--quick] [--only STEPS] [pytest args...]
#
# STEPS: a comma-separated subset of cpp,valgrind,python (default: all three).
# --quick: the C++ tests' --quick shapes under ASan too, and a subset of the Python suite (the
# kernel, fuzz, bad-input and concurrency tests at reduced hypothesis example counts). CI runs
# `--quick --only cpp,valgrind` (make sanitize-ci). Pytest args after the options replace the
# default test selection.
# Environment: VENV (default .venv) provides torch, pytest, hypothesis, scikit-build-core.
# Exit status non-zero on the first failing step; each step prints one summary line.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
QUICK=0
ONLY=
while (($#)); do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    *) break ;;
  esac
done
VENV=${VENV:-.venv}
PY=$VENV/bin/python
fail() { echo "sanitize: $*" >&2; exit 1; }
want() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }
cpp_args=()
((QUICK)) && cpp_args=(--quick)

# ---- 1. C++ tests, ASan + UBSan ---------------------------------------------------------------
if want cpp; then
  t0=$SECONDS
  SANITIZE=1 bash scripts/test_cpp.sh "${cpp_args[@]}"
  echo "sanitize: C++ kernel tests clean under ASan+UBSan ($((SECONDS - t0)) s)"
fi

# ---- 2. C++ tests under valgrind memcheck -------------------------------------------------------
if want valgrind; then
  if ! command -v valgrind >/dev/null 2>&1; then
    SUDO=
    [[ $(id -u) != 0 ]] && SUDO=sudo
    { $SUDO apt-get install -y valgrind || { $SUDO apt-get update && $SUDO apt-get install -y valgrind; }; } \
      >/tmp/sanitize-apt.log 2>&1 || { tail -20 /tmp/sanitize-apt.log >&2; fail "could not install valgrind"; }
  fi
  t0=$SECONDS
  VALGRIND=1 bash scripts/test_cpp.sh --quick
  echo "sanitize: C++ kernel tests (--quick) clean under valgrind memcheck ($((SECONDS - t0)) s)"
fi

# ---- 3. the Python suite (CPU) against an ASan + UBSan build of lowbit._C -----------------------
if want python; then
  [[ -x $PY ]] || fail "$PY not found: run 'make setup' first"
  CXX=${CXX:-c++}
  LIBASAN=$($CXX -print-file-name=libasan.so)
  LIBSTDCXX=$($CXX -print-file-name=libstdc++.so)
  [[ -f $LIBASAN ]] || fail "$CXX has no libasan.so ($LIBASAN)"
  AVENV=$ROOT/build/asan-venv
  BUILD=$ROOT/build/asan-py
  LOG=$ROOT/build/asan-py.log
  mkdir -p "$ROOT/build"
  site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [[ ! -x $AVENV/bin/python ]]; then
    "$PY" -m venv --without-pip "$AVENV"
  fi
  asite=$("$AVENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The .venv's packages as a plain path entry: its .pth files (the editable lowbit's import
  # hook among them) are not run, so `import lowbit` finds the ASan build installed below.
  echo "$site" >"$asite/_project_venv.pth"
  t0=$SECONDS
  : >"$LOG"
  # Install the sanitized build: a regular (non-editable) install into build/asan-venv.
  if ! CXX=$CXX "$PY" -m pip install --no-build-isolation --no-deps --no-compile --upgrade \
      --target "$asite" -Ccmake.define.LOWBIT_SANITIZE=ON -Cbuild-dir="$BUILD" \
      -Ccmake.build-type=RelWithDebInfo . >>"$LOG" 2>&1; then
    tail -30 "$LOG" >&2
    fail "building lowbit with ASan+UBSan failed (log: $LOG)"
  fi
  so=$(ls "$asite"/lowbit/_C*.so)
  nm -D "$so" | grep -q __asan_init || fail "$so is not instrumented (no __asan_init)"
  # Tests: the whole suite but the Triton kernels (pure Python/numpy under the interpreter,
  # nothing native to check) and the SmolLM2 model test (minutes of torch time under ASan).
  if (($#)); then
    tests=("$@")
  elif ((QUICK)); then
    tests=(tests/test_kernels.py tests/test_fast_path.py tests/test_fuzz.py tests/test_bad_input.py
           tests/test_concurrency.py tests/test_errors.py tests/test_formats.py)
    export LOWBIT_FUZZ_SCALE=${LOWBIT_FUZZ_SCALE:-0.2}
  else
    tests=(tests --ignore=tests/test_gpu_kernels.py --ignore=tests/test_model.py)
  fi
  # Preloads: the ASan runtime must come first in an uninstrumented interpreter, and libstdc++
  # must be loaded before ASan resolves its __cxa_throw interceptor (CPython does not link it;
  # without it the first C++ exception aborts in the interceptor). detect_leaks=0: CPython and
  # torch keep allocations alive at exit by design. Reports go to files (log_path), not to
  # stderr, which pytest captures; UBSan stops at its first report (-fno-sanitize-recover).
  out=$ROOT/build/asan-py.out
  reports=$ROOT/build/asan-py-report
  rm -f "$reports".*
  rc=0
  export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
  export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:log_path=$reports
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$reports
  {
    "$AVENV/bin/python" -c 'import lowbit._C as C; print("lowbit._C:", C.__file__)' &&
      "$AVENV/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
  } >"$out" 2>&1 || rc=$?
  unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS
  if compgen -G "$reports.*" >/dev/null; then
    head -60 "$reports".* >&2
    fail "sanitizer report(s) from the Python suite: $reports.* (pytest output: $out)"
  fi
  if [[ $rc != 0 ]]; then
    tail -30 "$out" >&2
    fail "Python suite under ASan+UBSan: exit status $rc (full output: $out)"
  fi
  echo "sanitize: Python suite (CPU) clean against lowbit._C built with ASan+UBSan: $(tail -n 1 "$out") ($((SECONDS - t0)) s)"
fi
